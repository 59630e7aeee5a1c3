"""The global gradient norm and clipping, the same for every backend (plain or DTensor gradients).

Per-tensor norms are accumulated in fp64: an fp32 norm of a million-element gradient is only
good to ~1e-5 relative and its error depends on how the tensor is split, so fp32 norms of
sharded and unsharded gradients would disagree; fp64 makes them agree to ~1e-9.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor


@contextlib.contextmanager
def _quiet_redistribute() -> Iterator[None]:
    """DTensor warns that reducing a norm over a 2-D mesh (FSDP x TP) takes two all-reduces: true, and
    negligible for one scalar per step."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, *,
                    pipeline_group: Any | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients (fp32 scalar, fp64 for fp64 gradients; before clipping); clips in place
    when max_norm > 0.

    Sharded (DTensor) gradients give the norm of the full gradient: partial norms are reduced
    over the device mesh. Under pipeline parallelism each rank holds other parameters: the
    squared norms are summed over ``pipeline_group``.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params if p.grad is not None]
    with _quiet_redistribute():
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float64) for g in grads]
        # DTensor norms combine only on one mesh; expert parallelism puts the experts on a mesh of their own.
        by_mesh: dict[Any, list[int]] = {}
        for i, norm in enumerate(norms):
            by_mesh.setdefault(norm.device_mesh if isinstance(norm, DTensor) else None, []).append(i)
        parts = []
        for indices in by_mesh.values():
            part: torch.Tensor = torch.linalg.vector_norm(torch.stack([norms[i] for i in indices]))
            parts.append(part.full_tensor() if isinstance(part, DTensor) else part)
        total = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))
    if pipeline_group is not None:
        squared = total.double().pow(2)
        torch.distributed.all_reduce(squared, group=pipeline_group)
        total = squared.sqrt()
    # fp32 (fp64 for fp64 gradients: train.precision=fp64 compares layouts to ~1e-12).
    total = total.to(torch.float64 if grads[0].dtype == torch.float64 else torch.float32)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for indices in by_mesh.values():
            torch._foreach_mul_([grads[i] for i in indices], coef)
    return total
