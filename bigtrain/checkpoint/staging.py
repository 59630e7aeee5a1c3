"""Host-memory snapshots of training state for async checkpoint saves.

An async save must write the state as it was at the save step while the step loop goes on
changing it. :func:`stage` copies every tensor into host buffers (the only part of an async save
the step loop waits for) and copies the small non-tensor leaves, so the background writer sees a
frozen snapshot. Used by the DCP path (single/DDP/FSDP2) and by DeepSpeed's checkpoint engine wrapper.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def stage(state: Any, cache: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A host-memory copy of ``state`` that the training step can no longer change.

    DTensors keep their mesh and placements around a copied local shard, so DCP still writes each
    rank's own shard. Copies go into ``cache`` buffers reused from the previous save (same key,
    shape and dtype): after the first save no memory is allocated, so the stall is one memcpy.
    On CUDA the buffers are pinned, making the device-to-host copy a DMA (the caller synchronizes).
    Views are copied compactly (a view of a large flat buffer does not drag the whole buffer along).
    Other leaves (DeepSpeed's loss scaler, config objects) are deep-copied.
    """
    if isinstance(state, dict):
        items = {k: stage(v, cache, f"{prefix}{k}.") for k, v in state.items()}
        return OrderedDict(items) if isinstance(state, OrderedDict) else items
    if isinstance(state, _IMMUTABLE):
        return state
    if isinstance(state, (list, tuple)) and not hasattr(state, "_fields"):
        return type(state)(stage(v, cache, f"{prefix}{i}.") for i, v in enumerate(state))
    if not isinstance(state, torch.Tensor):
        return copy.deepcopy(state)
    from torch.distributed.tensor import DTensor

    local = state.to_local() if isinstance(state, DTensor) else state
    key = prefix.rstrip(".")
    buf = cache.get(key)
    if buf is None or buf.shape != local.shape or buf.dtype != local.dtype:
        buf = torch.empty(local.shape, dtype=local.dtype, device="cpu",
                          pin_memory=local.device.type == "cuda" and torch.cuda.is_available())
        cache[key] = buf
    buf.copy_(local.detach(), non_blocking=local.device.type == "cuda")
    if isinstance(state, DTensor):
        return DTensor.from_local(buf, state.device_mesh, state.placements, run_check=False,
                                  shape=state.shape, stride=state.stride())
    return buf


def host_copy(obj: Any) -> Any:
    """A fresh host copy of a small nested state (RNG, data-pipeline position); no buffer reuse."""
    return stage(obj, {})
