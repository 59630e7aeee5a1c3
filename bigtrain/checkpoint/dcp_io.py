"""``torch.distributed.checkpoint`` (DCP) reading and writing for the single, DDP and FSDP2 backends.

Every rank writes its own shard (``__<rank>_0.distcp``) plus, on the coordinator, ``.metadata``;
nothing is gathered to rank 0. Loading reshards: each rank reads the pieces of the saved shards
that overlap the tensors it holds now, whatever the world size was at save time.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

# One process needs no process group; DCP warns about that on every call, which is only noise here.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def save(state: dict[str, Any], path: Path, process_group: Any | None) -> None:
    """Write ``state`` (may hold DTensors) as a DCP checkpoint into ``path`` (collective over the group)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(path), process_group=process_group, no_dist=process_group is None)


def stage(state: Any, cache: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A host-memory copy of ``state`` that the training step can no longer change (the async save's stall).

    DTensors keep their mesh and placements around a copied local shard, so DCP still writes each
    rank's own shard. Copies go into ``cache`` buffers reused from the previous save (same key,
    shape and dtype): after the first save no memory is allocated, so the stall is one memcpy.
    On CUDA the buffers are pinned, making the device-to-host copy a DMA.
    """
    if isinstance(state, dict):
        return {k: stage(v, cache, f"{prefix}{k}.") for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(stage(v, cache, f"{prefix}{i}.") for i, v in enumerate(state))
    if not isinstance(state, torch.Tensor):
        return state
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


def load(template: dict[str, Any], path: Path, process_group: Any | None) -> None:
    """Fill ``template`` (tensors / DTensors shaped for the current run) in place from ``path``."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=str(path), process_group=process_group, no_dist=process_group is None)


def read_full(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The full, unsharded tensors under ``key`` of a DCP checkpoint, read in one process (no GPUs, any world size)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(keys={key}),
                     no_dist=True)
    return dict(sd[key])
