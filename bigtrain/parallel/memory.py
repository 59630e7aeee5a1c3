"""What a rank really holds: bytes of parameters, gradients and optimizer state, measured from tensors.

``bigtrain plan`` (:mod:`bigtrain.plan`) predicts these numbers; this module measures them, so
tests can hold the two against each other. Sharded tensors (FSDP2 ``DTensor``) count only
their local shard, and every storage is counted once: tied weights, views into a flat
buffer (FSDP2's reduce-scatter output, DDP's ``gradient_as_bucket_view``) and FSDP2's
padding are counted as the allocator sees them — whole storages, padding included.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[tuple[str, int], int] | None:
    """(device, storage pointer) and the storage's size in bytes; None for empty or meta storages."""
    t = _local(t)
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:  # e.g. an FSDP2 unsharded parameter whose storage was freed after forward
        return None
    return (str(t.device), storage.data_ptr()), nbytes


def _count(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    """Sum of the storages behind ``tensors`` not already in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        found = _storage_key_and_bytes(t)
        if found is None:
            continue
        key, nbytes = found
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        values = state.values() if isinstance(state, dict) else [state]
        for value in values:
            if isinstance(value, torch.Tensor):
                yield value


def held_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes this rank really holds: ``{"params", "grads", "optimizer", "total"}``.

    Works for plain models, DDP-wrapped models (``.parameters()`` reaches the inner module)
    and FSDP2 models (DTensor parameters and gradients count their local shards). A storage
    counted under an earlier key is not counted again under a later one.
    """
    seen: set[tuple[str, int]] = set()
    params = list(model.parameters())  # deduplicates tied parameters
    n_params = _count(params, seen)
    n_grads = _count((p.grad for p in params if p.grad is not None), seen)
    n_optim = _count(_optimizer_tensors(optimizer), seen) if optimizer is not None else 0
    return {"params": n_params, "grads": n_grads, "optimizer": n_optim, "total": n_params + n_grads + n_optim}
