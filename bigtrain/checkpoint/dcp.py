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

Checkpoints whose files are intact (their CRCs match) may still not be valid DCP data: a shard of random
bytes, a truncated shard, a ``.metadata`` that is a DCP ``Metadata`` whose fields are of the wrong types or
point outside the checkpoint, or items that do not fit this run's optimizer. The metadata is checked field by
field when it is read (:func:`metadata_problem`); any failure while reading the data or applying it is a
:class:`CheckpointDataError`, one line naming the file where known. A resume reports it and, with
``checkpoint.resume=auto``, falls back to an older checkpoint; ``generate`` / ``export`` exit 2 with it.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
from pathlib import Path, PurePath, PurePosixPath
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


class CheckpointDataError(RuntimeError, UserError):
    """A checkpoint's DCP data could not be read or applied (a shard that is not tensor data, a truncated shard,
    items that do not fit this run). A ``RuntimeError``, so that a resume treats the checkpoint like any unloadable
    one (``checkpoint.resume=auto`` skips it), and a ``UserError``: one line and exit 2, never a traceback."""


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
    problem = metadata_problem(metadata)
    if problem is not None:
        raise MetadataError(f"{path}: not usable DCP metadata ({problem}); this checkpoint is damaged or was "
                            f"tampered with")
    return metadata


def _is_index(value: Any, ndim: int | None = None) -> bool:
    """A ``torch.Size`` (of ``ndim`` entries, when given): what DCP keeps tensor sizes and offsets in."""
    return isinstance(value, torch.Size) and (ndim is None or len(value) == ndim)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain_relative(name: Any) -> bool:
    """A file name DCP may read: relative, inside the checkpoint folder (no '..', no absolute path)."""
    if not isinstance(name, (str, PurePath)) or not str(name):
        return False
    pure = PurePosixPath(str(name))
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in str(name)


def metadata_problem(metadata: Any) -> str | None:
    """What makes a :class:`~torch.distributed.checkpoint.metadata.Metadata` unusable, in a few words (None: it is
    usable): every field of the type DCP's own writer gives it, tensor chunks inside their tensors, every item
    stored somewhere, shard files inside the checkpoint folder. The unpickler admits only DCP's classes, but
    still in any arrangement: without this check a wrong one fails deep inside DCP (or in generate / export) with
    an ``AttributeError`` or ``TypeError``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict):
        return f"its item list is a {type(entries).__name__}, not a dict"
    if not isinstance(storage, dict):
        return f"its storage index is a {type(storage).__name__}, not a dict"
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        return f"its storage_meta is a {type(metadata.storage_meta).__name__}"
    if metadata.planner_data is not None and not isinstance(metadata.planner_data, dict):
        return f"its planner_data is a {type(metadata.planner_data).__name__}"
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or not isinstance(key.fqn, str):
            return f"its storage index has a key of type {type(key).__name__}"
        if not isinstance(info, _StorageInfo):
            return f"the storage of {key.fqn!r} is a {type(info).__name__}"
        if not _plain_relative(info.relative_path):
            return f"the storage of {key.fqn!r} names {_shown(str(info.relative_path))}, not a file of the checkpoint"
        if not (_is_count(info.offset) and _is_count(info.length)):
            return f"the storage of {key.fqn!r} has offset {info.offset!r:.40}, length {info.length!r:.40}"
        descriptors = info.transform_descriptors
        if descriptors is not None and not (isinstance(descriptors, (list, tuple))
                                            and all(isinstance(d, str) for d in descriptors)):
            return f"the storage of {key.fqn!r} has transform descriptors of type {type(descriptors).__name__}"
    # Any admitted object may sit anywhere: the fields' declared types are what is being checked.
    entry: Any
    chunk: Any
    size: Any
    props: Any
    chunks: Any
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            return f"it has an item named by a {type(fqn).__name__}"
        if isinstance(entry, BytesStorageMetadata):
            if MetadataIndex(fqn) not in storage:
                return f"item {fqn!r} is stored nowhere"
            continue
        if not isinstance(entry, TensorStorageMetadata):
            return f"item {fqn!r} is described by a {type(entry).__name__}"
        size, props, chunks = entry.size, entry.properties, entry.chunks
        if not (_is_index(size) and isinstance(props, TensorProperties)
                and isinstance(getattr(props, "dtype", None), torch.dtype)
                and isinstance(chunks, list)):
            return f"item {fqn!r} has a malformed tensor description"
        ndim = len(size)
        for chunk in chunks:
            if not (isinstance(chunk, ChunkStorageMetadata) and _is_index(chunk.offsets, ndim)
                    and _is_index(chunk.sizes, ndim)
                    and all(o >= 0 and o + n <= whole for o, n, whole in zip(chunk.offsets, chunk.sizes, size,
                                                                            strict=True))):
                return f"a piece of tensor {fqn!r} {tuple(size)} lies outside it"
            if MetadataIndex(fqn, chunk.offsets) not in storage:
                return f"a piece of tensor {fqn!r} (at {tuple(chunk.offsets)}) is stored nowhere"
    return None


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """A FileSystemReader whose metadata is read with :class:`_MetadataUnpickler` (once: DCP asks again)."""

        _metadata: Any = None
        _reading: str | None = None  # the shard file being read (named when its data is not valid)

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

        def _slice_file(self, file: Any, sinfo: Any) -> Any:
            self._reading = str(sinfo.relative_path)  # the shard file a failure below is in
            return super()._slice_file(file, sinfo)

        def reading(self) -> str | None:
            return self._reading

        def read_data(self, plan: Any, planner: Any) -> Any:
            self._reading = None
            try:
                return super().read_data(plan, planner)
            except Exception as exc:  # inside DCP it becomes a CheckpointException: keep the message short
                where = f"{self.reading()}: " if self.reading() else ""
                what = describe_failure(exc)
                if not isinstance(exc, OSError):
                    what = f"not valid DCP data ({what})"
                raise CheckpointDataError(f"{where}{what}") from None

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

    reader = _reader_with_metadata(path)  # a MetadataError (an UnpicklingError) or OSError: reported as they are
    try:
        dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(), process_group=process_group,
                 no_dist=process_group is None)
    except _checkpoint_exception() as exc:  # a BaseException: the resume's fallback would never see it
        raise CheckpointDataError(_first_failure(exc)) from None


def read_full(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The full, unsharded tensors under ``key`` of a DCP checkpoint, read in one process (no GPUs, any world size)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeEmptyPlanner(SafePlannerMixin, _EmptyStateDictLoadPlanner):
        pass

    sd: dict[str, Any] = {}
    damaged = "it is damaged or was tampered with (`bigtrain ckpt verify` checks it)"
    try:
        reader = _reader_with_metadata(path)
        _load_state_dict(sd, storage_reader=reader, planner=SafeEmptyPlanner(keys={key}), no_dist=True)
    except MetadataError:
        raise
    except OSError as exc:
        raise UserError(f"{path}: cannot read {exc.filename or 'the checkpoint'} ({exc.strerror or exc}).") from None
    except _checkpoint_exception() as exc:  # generate / export: one line and exit 2, not a traceback
        raise UserError(f"{path}: reading the checkpoint failed ({_first_failure(exc)}); {damaged}.") from None
    except Exception as exc:  # anything else the data makes DCP do: still the checkpoint's fault
        raise UserError(f"{path}: reading the checkpoint failed ({describe_failure(exc)}); {damaged}.") from None
    if key not in sd:
        raise UserError(f"{path}: the checkpoint holds no {key!r} entries.")
    entries = sd[key]
    bad = (f"a {type(entries).__name__}" if not isinstance(entries, dict) else
           next((repr(name) for name, value in entries.items()
                 if not isinstance(name, str) or not isinstance(value, torch.Tensor)), None))
    if bad is not None:
        raise UserError(f"{path}: its {key!r} entries are not named tensors ({_shown(bad)}); {damaged}.")
    return dict(entries)


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
        if isinstance(inner, CheckpointDataError):
            return str(inner)  # written here: already names the file and says what is wrong
        if isinstance(inner, BaseException):
            return describe_failure(inner)
    return describe_failure(exc)


_WEIGHTS_ONLY = "WeightsUnpickler error:"


def describe_failure(exc: BaseException) -> str:
    """``exc`` of reading or applying checkpoint data as one short line: ``Type: message``, without torch's advice
    (a refused ``weights_only`` load suggests ``weights_only=False``, which would run the file's code)."""
    text = " ".join(str(exc).split())
    if _WEIGHTS_ONLY in text:  # the restricted unpickler refused the bytes
        detail = text.split(_WEIGHTS_ONLY, 1)[1].split(" Check the documentation of torch.load", 1)[0].strip()
        return f"the restricted unpickler refused it: {detail[:160]}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    if text.startswith("PytorchStreamReader failed"):  # a truncated or overwritten torch.save record
        return text.split(". ", 1)[0]
    if isinstance(exc, EOFError):
        return "it ends early (EOFError)"
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            load(template, ckpt_dir / self.subdir, process_group)
            try:
                set_state_dict(strategy.unwrap(model), optimizer, model_state_dict=template["model"],
                               optim_state_dict=template["optimizer"])
            except Exception as exc:  # items of the wrong kind (a number where the parameter list belongs)
                raise CheckpointDataError(f"its model/optimizer items do not fit this run "
                                          f"({describe_failure(exc)})") from None
        finally:
            # This run's hyperparameters win (the trainer warns when they changed); also after a failed load, so
            # that the older checkpoint a resume falls back to starts from this run's values, not the bad ones.
            for group, values in zip(optimizer.param_groups, hyper, strict=True):
                group.update(values)

    def read_full_weights(self, ckpt_dir: Path) -> dict[str, torch.Tensor]:
        weights = read_full(ckpt_dir / self.subdir, "model")
        _check_architecture(ckpt_dir, weights)
        return weights

    def required_files(self, ckpt_dir: Path, manifest: Manifest) -> set[str]:
        """``.metadata`` and every shard file it points to."""
        return {f"{self.subdir}/.metadata"} | {f"{self.subdir}/{name}"
                                               for name in read_storage_files(ckpt_dir / self.subdir)}


def _check_architecture(ckpt_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """The weights read are exactly the model the manifest's config describes (names and shapes).

    A resume's load checks this against its own model; generate and export build theirs from what they read, so a
    ``.metadata`` that describes other tensors (one missing, one of another shape) would otherwise surface as a
    traceback in ``load_state_dict`` or as an incomplete export."""
    from bigtrain.checkpoint.manifest import ManifestError, read_manifest
    from bigtrain.model import build_on_meta
    from bigtrain.model.config import ModelConfig
    from bigtrain.sections import parse_section

    try:
        config = read_manifest(ckpt_dir).config.get("model", {})
    except ManifestError as exc:
        raise UserError(str(exc)) from None
    expected = {name: tuple(t.shape) for name, t in build_on_meta(parse_section(ModelConfig, config, "model"))
                .state_dict().items()}
    problems = [f"{name} is missing" for name in expected if name not in weights]
    problems += [f"{name} has shape {tuple(weights[name].shape)}, the model's is {shape}"
                 for name, shape in expected.items() if name in weights and tuple(weights[name].shape) != shape]
    problems += [f"{_shown(name)} is not a weight of the model" for name in weights if name not in expected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{ckpt_dir / DCPBackend.subdir}: its weights do not match the model its manifest describes: "
                        f"{'; '.join(problems[:3])}{more}; it is damaged or was tampered with (`bigtrain ckpt "
                        f"verify` checks it).")
