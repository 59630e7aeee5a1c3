"""The ``dcp`` checkpoint backend: ``torch.distributed.checkpoint`` files for the single, DDP and FSDP2 strategies.

Every rank writes its own shard files (``__<rank>_<n>.distcp``, one per writer thread) plus, on the
coordinator, ``.metadata``; nothing is gathered to rank 0. Loading reshards: each rank reads the
pieces of the saved shards that overlap the tensors it holds now, whatever the world size was at
save time.

Checkpoints are untrusted input. torch reads DCP's ``.metadata`` with a plain ``pickle.load`` and its
non-tensor items (e.g. optimizer hyperparameters) with ``torch.load(weights_only=False)``: loading a
crafted checkpoint could run code. bigtrain reads both through :class:`SafeReader` and
:class:`SafePlannerMixin`: the metadata with an unpickler that admits only DCP's own metadata
classes, ``torch.Size``, dtypes and paths; the items with ``weights_only=True``.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.checkpoint.backend import SaveJob
from bigtrain.checkpoint.manifest import Manifest
from bigtrain.checkpoint.staging import stage
from bigtrain.parallel.strategy import Strategy

# One process needs no process group; DCP warns about that on every call, which is only noise here.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def writer_threads() -> int:
    """Writer threads per rank: the CPUs this process may use, shared with the other ranks of its node, at most 4.

    DCP serializes and writes one file per thread; on a 2-core machine two threads cut the save time
    by ~30% (bench/checkpoint.py), more threads than cores only add contention.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, cpus // local_ranks))


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP metadata is made of; anything else is refused before it is built."""

    _ALLOWED = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):  # metadata dataclasses and enums, never functions
                return found
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """A FileSystemReader whose metadata is read with :class:`_MetadataUnpickler`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


class SafePlannerMixin:
    """Non-tensor items (bytes in the checkpoint) are loaded with ``weights_only=True``."""

    flatten_state_dict: bool
    original_state_dict: Any
    mappings: Any
    state_dict: Any

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def safe_reader(path: Path) -> Any:
    """A reader for ``path`` that never unpickles arbitrary objects."""
    return _safe_reader_class()(str(path))


def read_storage_files(path: Path) -> set[str]:
    """The shard files (relative to ``path``) that ``path/.metadata`` says hold the checkpoint's data."""
    metadata = safe_reader(path).read_metadata()
    return {str(info.relative_path) for info in (metadata.storage_data or {}).values()}


def save(state: dict[str, Any], path: Path, process_group: Any | None) -> None:
    """Write ``state`` (may hold DTensors) as a DCP checkpoint into ``path`` (collective over the group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True, thread_count=writer_threads())
    dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=process_group is None)


def load(template: dict[str, Any], path: Path, process_group: Any | None) -> None:
    """Fill ``template`` (tensors / DTensors shaped for the current run) in place from ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(SafePlannerMixin, DefaultLoadPlanner):
        pass

    dcp.load(template, storage_reader=safe_reader(path), planner=SafeLoadPlanner(), process_group=process_group,
             no_dist=process_group is None)


def read_full(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The full, unsharded tensors under ``key`` of a DCP checkpoint, read in one process (no GPUs, any world size)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeEmptyPlanner(SafePlannerMixin, _EmptyStateDictLoadPlanner):
        pass

    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=safe_reader(path), planner=SafeEmptyPlanner(keys={key}), no_dist=True)
    return dict(sd[key])


def model_and_optimizer_state(strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} as this rank holds them (FSDP: DTensor shards; no gathering), keyed by parameter
    name. What a save writes, and the template a load fills in."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # get_state_dict creates AdamW's lazy state (a zero-gradient, lr=0 step: weights unchanged)
    # so a checkpoint taken before the first step still has every key a later one has.
    msd, osd = get_state_dict(strategy.unwrap(model), optimizer)
    return {"model": msd, "optimizer": osd}


class DCPBackend:
    """Every rank writes its own shards under ``dcp/``; a load reshards to this run's layout."""

    format = "dcp"
    subdir = "dcp"

    def __init__(self) -> None:
        self._staging: dict[str, torch.Tensor] = {}  # host buffers reused by every async save

    def save(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             staged: bool, process_group: Any | None) -> SaveJob:
        state = model_and_optimizer_state(strategy, model, optimizer)
        if staged:
            state = stage(state, self._staging)  # the only part of an async save the step loop waits for
        target = ckpt_dir / self.subdir
        return SaveJob(write=lambda: save(state, target, process_group))

    def load(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             saved_world_size: int, process_group: Any | None) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        template = model_and_optimizer_state(strategy, model, optimizer)
        load(template, ckpt_dir / self.subdir, process_group)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        set_state_dict(strategy.unwrap(model), optimizer, model_state_dict=template["model"],
                       optim_state_dict=template["optimizer"])
        for group, values in zip(optimizer.param_groups, hyper, strict=True):
            group.update(values)  # this run's hyperparameters win (the trainer warns when they changed)

    def read_full_weights(self, ckpt_dir: Path) -> dict[str, torch.Tensor]:
        return read_full(ckpt_dir / self.subdir, "model")

    def required_files(self, ckpt_dir: Path, manifest: Manifest) -> set[str]:
        """``.metadata`` and every shard file it points to."""
        return {f"{self.subdir}/.metadata"} | {f"{self.subdir}/{name}"
                                               for name in read_storage_files(ckpt_dir / self.subdir)}
