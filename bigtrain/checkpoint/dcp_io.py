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
