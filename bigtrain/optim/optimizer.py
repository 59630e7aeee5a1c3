"""AdamW with decay / no-decay parameter groups."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (linear and embedding weights) decay; vectors (norm gains, biases) do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A ZeRO-3 parameter partitioned at construction holds an empty tensor; its real shape is ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw_kwargs(params: Sequence[torch.Tensor], device_type: str | None = None) -> dict[str, Any]:
    """``fused=True`` when every parameter is on CUDA (one multi-tensor kernel for the whole update,
    no host sync: the step stays asynchronous), ``foreach=True`` elsewhere (CPU keeps the
    implementation the golden losses were recorded with). ``device_type`` overrides detection."""
    kind = device_type or (params[0].device.type if params and all(p.device.type == params[0].device.type
                                                                    for p in params) else "mixed")
    return {"fused": True} if kind == "cuda" else {"foreach": True}


def build_adamw(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA (one kernel for all params), foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **adamw_kwargs(params))
