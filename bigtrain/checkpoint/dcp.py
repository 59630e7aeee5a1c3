"""The ``dcp`` checkpoint backend: ``torch.distributed.checkpoint`` files for the single, DDP and FSDP2 strategies.

Every rank writes its own shard files (``__<rank>_<n>.distcp``, one per writer thread) plus, on the
coordinator, ``.metadata``; nothing is gathered to rank 0. Loading reshards: each rank reads the
pieces of the saved shards that overlap the tensors it holds now, whatever the world size was at
save time.

Checkpoints are untrusted input. torch reads DCP's ``.metadata`` with a plain ``pickle.load`` and its
non-tensor items (e.g. optimizer hyperparameters) with ``torch.load(weights_only=False)``: loading a
crafted checkpoint could run code. bigtrain reads both through :class:`SafeReader` and
:class:`SafePlannerMixin`: the metadata with an unpickler that admits only DCP's own metadata
classes, ``torch.Size``, dtypes and paths (an explicit list of plain names, :func:`_admitted_globals`);
the items with ``weights_only=True``. A refused ``.metadata`` is a :class:`MetadataError`.
"""
from __future__ import annotations

import functools
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
from bigtrain.errors import UserError
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


class MetadataError(pickle.UnpicklingError, UserError):
    """A ``.metadata`` bigtrain will not load: it names a global outside :func:`_admitted_globals`, or it is not
    DCP metadata at all. An ``UnpicklingError``, so that a resume treats the checkpoint like any unloadable one
    (``checkpoint.resume=auto`` skips it), and a ``UserError``, so that ``generate`` / ``export`` of that checkpoint
    exit 2 with the message instead of a traceback."""


# Every global a DCP ``.metadata`` pickle names, as the real objects and the modules a pickle may spell them in.
# Derived by listing the globals (a recording ``find_class``) of real checkpoints saved by torch 2.13: single,
# FSDP2 with AdamW and with Muon, FSDP2 + tensor parallel, MoE with expert parallel, bf16 training; all name the
# same ones. ``pathlib._local`` is where Python 3.13 defines (and so pickles) the path classes; a spelling whose
# module or attribute does not exist here is never admitted (see ``find_class``). The containers were admitted
# before and are inert (older metadata may hold them).
@functools.cache
def _admitted_globals() -> dict[tuple[str, str], object]:
    import collections
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    real: list[tuple[Any, tuple[str, ...]]] = [
        (metadata.Metadata, ("torch.distributed.checkpoint.metadata",)),
        (metadata.MetadataIndex, ("torch.distributed.checkpoint.metadata",)),
        (metadata.StorageMeta, ("torch.distributed.checkpoint.metadata",)),
        (metadata.TensorStorageMetadata, ("torch.distributed.checkpoint.metadata",)),
        (metadata.BytesStorageMetadata, ("torch.distributed.checkpoint.metadata",)),
        (metadata.ChunkStorageMetadata, ("torch.distributed.checkpoint.metadata",)),
        (metadata.TensorProperties, ("torch.distributed.checkpoint.metadata",)),
        (metadata._MEM_FORMAT_ENCODING, ("torch.distributed.checkpoint.metadata",)),
        (filesystem._StorageInfo, ("torch.distributed.checkpoint.filesystem",)),
        (torch.Size, ("torch",)),
        # A function, but a fixed one: it maps a layout's name ("torch.strided") to the torch.layout object.
        (torch.serialization._get_layout, ("torch.serialization",)),
        (collections.OrderedDict, ("collections",)),
        (set, ("builtins",)),
        (frozenset, ("builtins",)),
        *((getattr(pathlib, name), ("pathlib", "pathlib._local"))
          for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
    ]
    return {(module, obj.__name__): obj for obj, modules in real for module in modules}


def _module_attribute(module: str, name: str) -> object:
    """``module``'s own attribute ``name`` (no dotted walk), importing ``module`` (only ever one named in
    :func:`_admitted_globals`); None where either does not exist."""
    import importlib
    import sys

    found = sys.modules.get(module)
    if found is None:
        try:
            found = importlib.import_module(module)
        except ImportError:
            return None
    return vars(found).get(name)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly the globals DCP metadata is made of; anything else is refused before it is built.

    No prefix or type rule: with pickle protocol >= 4 a dotted name walks attributes through whatever a module
    imported (``torch.distributed.checkpoint._async_executor`` -> ``dist.typing.types.FunctionType``), so any
    "every class of these modules" rule admits ``types.CodeType`` and ``types.FunctionType``, enough to build
    and call a function from bytecode. Names are therefore plain (no '.'), looked up in an explicit table, and
    the module's attribute must be that very object.
    """

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            expected = _admitted_globals().get((module, name))
            if expected is not None and _module_attribute(module, name) is expected:
                return expected
            if module == "torch":  # dtypes pickle as torch.<name>; vars(): no lazy torch.__getattr__ imports
                dtype = vars(torch).get(name)
                if isinstance(dtype, torch.dtype):
                    return dtype
        raise MetadataError(f"refusing to load {_shown(module)}, {_shown(name)}: not part of DCP metadata")


def read_metadata_file(path: Path) -> Any:
    """Unpickle one ``.metadata`` file with :class:`_MetadataUnpickler`; a :class:`MetadataError` naming ``path``
    for anything but DCP metadata made of the admitted globals."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except MetadataError as exc:
        raise MetadataError(f"{path}: {exc}; this checkpoint was written by another program or tampered with "
                            f"(bigtrain loads only DCP's metadata classes, torch.Size, dtypes and paths from "
                            f"it)") from None
    except OSError:
        raise  # a missing or unreadable file is reported as such
    except Exception as exc:  # any other failure to build it from the admitted globals: unusable
        first = " ".join(str(exc).split())[:200]
        raise MetadataError(f"{path}: not readable DCP metadata ({type(exc).__name__}: {first})") from None
    if not isinstance(metadata, Metadata):
        raise MetadataError(f"{path}: not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """A FileSystemReader whose metadata is read with :class:`_MetadataUnpickler` (once: DCP asks again)."""

        _metadata: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            if rank is None and self._metadata is not None:
                return self._metadata
            metadata = read_metadata_file(Path(self._get_metadata_path(rank)))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if rank is None:
                self._metadata = metadata
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

    reader = _reader_with_metadata(path)
    try:
        dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group,
                 no_dist=process_group is None)
    except _checkpoint_exception() as exc:  # a BaseException: the resume's fallback would never see it
        raise RuntimeError(_first_failure(exc)) from None


def read_full(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The full, unsharded tensors under ``key`` of a DCP checkpoint, read in one process (no GPUs, any world size)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeEmptyPlanner(SafePlannerMixin, _EmptyStateDictLoadPlanner):
        pass

    sd: dict[str, Any] = {}
    try:
        reader = _reader_with_metadata(path)
        _load_state_dict(sd, storage_reader=reader, planner=SafeEmptyPlanner(keys={key}), no_dist=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {exc.filename or 'the checkpoint'} ({exc.strerror or exc}).") from None
    except _checkpoint_exception() as exc:  # generate / export: one line and exit 2, not a traceback
        raise UserError(f"{path}: reading the checkpoint failed ({_first_failure(exc)}); it is damaged or was "
                        f"tampered with (`bigtrain ckpt verify` checks it).") from None
    if key not in sd:
        raise UserError(f"{path}: the checkpoint holds no {key!r} entries.")
    return dict(sd[key])


def _reader_with_metadata(path: Path) -> Any:
    """A safe reader for ``path`` that has read (or refused: :class:`MetadataError`) the metadata already.

    DCP calls ``read_metadata`` inside its planning step, which turns any error into a ``CheckpointException``
    (a BaseException carrying a traceback) or, in torch 2.13, first logs it as a warning with its traceback;
    read here, a refused metadata stays a one-paragraph error."""
    reader = safe_reader(path)
    reader.read_metadata()
    return reader


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _first_failure(exc: BaseException) -> str:
    """The first rank's failure of a ``CheckpointException`` as ``Type: message`` (one line, no traceback)."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(inner, BaseException):
            return f"{type(inner).__name__}: {' '.join(str(inner).split())[:300]}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


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
