"""A crafted ``dcp/.metadata`` never runs code, ``ckpt ls`` never unpickles, and ``model.init_from`` reads no
weight file outside its folder (issue 28 §1).

The payloads are real exploits: loaded with a plain ``pickle.load`` each one creates a marker file
(:func:`test_the_payloads_are_real` proves it), so "no marker" below means "refused", not "harmless".
The main one is the attack the old unpickler let through: it admitted any *class* found in a
``torch.distributed.checkpoint.*`` module, and with pickle protocol >= 4 a dotted name walks
attributes (``_async_executor.dist.typing.types.FunctionType``), so a function built from bytecode
could be called.
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from bigtrain.checkpoint.dcp import MetadataError, _MetadataUnpickler, read_full, read_metadata_file
from bigtrain.checkpoint.hf import INDEX_FILE, hf_config, load_hf_weights, to_hf_state, write_safetensors
from bigtrain.checkpoint.manager import load_model_weights, verify
from bigtrain.checkpoint.manifest import MANIFEST_FILE, checksum_files, list_files
from bigtrain.errors import UserError
from bigtrain.model.config import ModelConfig
from bigtrain.sections import parse_section
from tests.helpers import cli, train

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=2",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5", "run.device=cpu", "log.console=false",
        "run.num_threads=2")
DCP_MODULE = "torch.distributed.checkpoint._async_executor"  # imports torch.distributed as `dist`


# ---------------------------------------------------------------------------------------------- pickle assembly
def _text(value: str) -> bytes:
    data = value.encode()
    if len(data) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def _global(module: str, name: str) -> bytes:
    """Push ``module.name`` the protocol-4 way (STACK_GLOBAL: a dotted ``name`` walks attributes)."""
    return _text(module) + _text(name) + pickle.STACK_GLOBAL


def _value(obj: object) -> bytes:
    """The opcodes that push ``obj`` (plain values only: str, bytes, int, tuple, ...), without PROTO, FRAME,
    STOP or memo entries, so that pieces can be concatenated."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=4)
    pickler.fast = True  # no MEMOIZE: the pieces' memo indices would collide
    pickler.dump(obj)
    data = buf.getvalue()
    assert data.startswith(b"\x80\x04") and data.endswith(pickle.STOP)
    data = data[2:-1]
    if data.startswith(pickle.FRAME):
        data = data[9:]
    assert not {op.name for op, _, _ in pickletools.genops(data + pickle.STOP)} & {"FRAME", "MEMOIZE", "BINGET"}
    return data


def _call(func: bytes, *args: bytes) -> bytes:
    """Push ``func(*args)`` (REDUCE: what unpickling an object with ``__reduce__`` does)."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _program(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + pickle.STOP


def _code_args(code: types.CodeType) -> tuple[object, ...]:
    """``types.CodeType``'s constructor arguments for ``code`` (Python 3.11 added qualname and exceptiontable)."""
    head = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_nlocals, code.co_stacksize,
            code.co_flags, code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_filename,
            code.co_name)
    if sys.version_info < (3, 11):
        return (*head, code.co_firstlineno, code.co_linetable, code.co_freevars, code.co_cellvars)
    return (*head, code.co_qualname, code.co_firstlineno, code.co_linetable, code.co_exceptiontable,
            code.co_freevars, code.co_cellvars)


def function_payload(marker: Path) -> bytes:
    """The issue's exploit: FunctionType(CodeType(...), {})() reached through dotted names in a DCP module."""
    outer = compile(f"lambda: __import__('pathlib').Path({str(marker)!r}).touch()", "<payload>", "eval")
    code = next(c for c in outer.co_consts if isinstance(c, types.CodeType))
    types_path = "dist.typing.types"
    make_code = _call(_global(DCP_MODULE, f"{types_path}.CodeType"), *(_value(a) for a in _code_args(code)))
    function = _call(_global(DCP_MODULE, f"{types_path}.FunctionType"), make_code, pickle.EMPTY_DICT)
    return _program(_call(function))  # call it


def _touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _system(module: str, name: str) -> Callable[[Path], bytes]:
    return lambda marker: _program(_call(_global(module, name), _value(_touch_command(marker))))


def _posix_path(marker: Path) -> bytes:
    return _call(_global("pathlib", "PosixPath"), _value(str(marker)))


def _file_handler(marker: Path) -> bytes:
    """copyreg._reconstructor(FileHandler, FileHandler, path): FileHandler.__init__ opens (creates) the file."""
    handler = _global("logging", "FileHandler")
    return _program(_call(_global("copyreg", "_reconstructor"), handler, handler, _value(str(marker))))


def _partial(marker: Path) -> bytes:
    made = _call(_global("functools", "partial"), _global("logging", "FileHandler"), _value(str(marker)))
    return _program(_call(made))


def _getattr(marker: Path) -> bytes:
    """getattr(PosixPath(marker), "touch")(): only builtins.getattr is not a metadata class."""
    method = _call(_global("builtins", "getattr"), _posix_path(marker), _value("touch"))
    return _program(_call(method))


def _eval(marker: Path) -> bytes:
    return _program(_call(_global("builtins", "eval"), _value(f"__import__('pathlib').Path({str(marker)!r}).touch()")))


def _dotted_method(marker: Path) -> bytes:
    """PosixPath.touch(PosixPath(marker)): a dotted name inside a module and class that are allowed."""
    return _program(_call(_global("pathlib", "PosixPath.touch"), _posix_path(marker)))


def _dcp_function(pristine: Path) -> Callable[[Path], bytes]:
    """torch.distributed.checkpoint.format_utils.dcp_to_torch_save(a good checkpoint, marker): a plain name in a
    DCP module, but a function that writes a file."""
    return lambda marker: _program(_call(_global("torch.distributed.checkpoint.format_utils", "dcp_to_torch_save"),
                                         _value(str(pristine)), _value(str(marker))))


PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    "function-from-bytecode": function_payload,
    "dotted-into-os": _system("torch.distributed.checkpoint.filesystem", "os.system"),
    "dotted-method": _dotted_method,
    "copyreg-reconstructor": _file_handler,
    "functools-partial": _partial,
    "builtins-getattr": _getattr,
    "builtins-eval": _eval,
    "os-system": _system("os", "system"),
    "posix-system": _system("posix", "system"),
}
DCP_FUNCTION = "dcp-function"  # needs the pristine checkpoint's path: built by _payload()


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("metadata") / "run"
    train(out, *TINY)
    return out


def _payload(name: str, marker: Path, run: Path) -> bytes:
    if name == DCP_FUNCTION:
        return _dcp_function(run / "checkpoints" / "step_000001" / "dcp")(marker)
    return PAYLOADS[name](marker)


def _plant(run: Path, tmp_path: Path, payload: bytes) -> tuple[Path, Path]:
    """A copy of ``run`` whose newest checkpoint's ``dcp/.metadata`` is ``payload``, resealed so that its manifest's
    sizes and checksums match (what an attacker can do: CRC32 catches accidents, not tampering)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "step_000002"
    (ckpt / "dcp" / ".metadata").write_bytes(payload)
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"] = checksum_files(ckpt, list_files(ckpt), fsync=False)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    return copy, ckpt


ALL = [*PAYLOADS, DCP_FUNCTION]


@pytest.mark.parametrize("name", ALL)
def test_the_payloads_are_real(name: str, run: Path, tmp_path: Path) -> None:
    """Each payload, loaded the way torch itself reads ``.metadata`` (plain pickle), runs its code."""
    marker = tmp_path / "pwned"
    pickle.loads(_payload(name, marker, run))
    assert marker.exists()


def _text_of(proc: subprocess.CompletedProcess) -> str:
    text = str(proc.stdout) + str(proc.stderr)
    assert "Traceback" not in text, text
    return text


class _Watch:
    """Records, while on, every file named ``.metadata`` opened (the ``open`` audit event: whatever code path
    reads it, it shows) and every global resolved by an unpickler with pickle's own ``find_class``."""

    on = False
    seen: ClassVar[list[str]] = []

    @classmethod
    def hook(cls, event: str, args: tuple[object, ...]) -> None:
        if not cls.on:
            return
        if event == "pickle.find_class" or (event == "open" and str(args[0]).endswith(".metadata")):
            cls.seen.append(f"{event}: {args[:2]}")


sys.addaudithook(_Watch.hook)  # hooks cannot be removed; off unless a test turns it on


def test_ckpt_ls_never_unpickles_or_opens_the_metadata(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    copy, _ = _plant(run, tmp_path, function_payload(marker))
    _Watch.seen.clear()
    _Watch.on = True
    try:
        proc = cli("ckpt", "ls", str(copy))
    finally:
        _Watch.on = False
    text = _text_of(proc)
    assert proc.returncode == 0 and not marker.exists(), text
    assert _Watch.seen == [], _Watch.seen
    lines = proc.stdout.splitlines()
    # Manifests and sizes cannot tell the index is bad: ls names it as auto's pick (the resume then skips it).
    assert any(line.startswith("step_000002") and "latest (resume: auto picks this)" in line for line in lines), text
    assert any(line.startswith("step_000001") and line.endswith("ok") for line in lines), text
    # ...while the cheap checks still steer the pick: a truncated shard moves it to the older checkpoint.
    shard = next((copy / "checkpoints" / "step_000002" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    lines = cli("ckpt", "ls", str(copy)).stdout.splitlines()
    assert any(line.startswith("step_000001") and "latest (resume: auto picks this)" in line for line in lines), lines


@pytest.mark.parametrize("name", ALL)
def test_no_verb_runs_a_crafted_metadata(name: str, run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    copy, ckpt = _plant(run, tmp_path, _payload(name, marker, run))
    refused = f"{ckpt / 'dcp' / '.metadata'}: refusing to load"
    out = tmp_path / "model.pt"

    def bigtrain(*args: str) -> tuple[int, str]:
        proc = cli(*args)
        assert not marker.exists(), f"bigtrain {' '.join(args)} ran the checkpoint's code"
        return proc.returncode, _text_of(proc)

    code, text = bigtrain("ckpt", "verify", str(ckpt))  # a bad checkpoint: verify's own status 1, naming why
    assert code == 1 and f"CORRUPT {ckpt}" in text and refused in text, text

    code, text = bigtrain("ckpt", "ls", str(copy))  # manifests and sizes only: nothing unpickled
    assert code == 0 and "step_000002" in text, text

    for args in (["generate", str(ckpt), "--max-new-tokens", "2", "--device", "cpu"],
                 ["export", str(ckpt), "--to", "torch", str(out)],
                 ["train", "configs/debug.yaml", f"run.out_dir={copy}", *TINY, f"checkpoint.resume={ckpt}"]):
        code, text = bigtrain(*args)
        assert code == 2 and refused in text, (args, text)
        assert not out.exists()

    # auto: the crafted checkpoint is skipped, saying why, and the run resumes from the older one.
    code, text = bigtrain("train", "configs/debug.yaml", f"run.out_dir={copy}", *TINY, "checkpoint.resume=auto")
    assert code == 0 and refused in text and "step_000002 skipped" in text, text
    assert "step_000001 at step 1" in text, text


# ---------------------------------------------------------------------------------------------- the admitted set
def test_real_metadata_loads(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real checkpoint's ``.metadata`` loads, every global it names admitted (the allow-list is not narrower
    than DCP needs; tests/checkpoint/test_checkpoint.py, test_reshard.py and the resume tests load single, DDP,
    FSDP and TP checkpoints through the same reader)."""
    from torch.distributed.checkpoint.metadata import Metadata

    named: list[tuple[str, str]] = []
    admit = _MetadataUnpickler.find_class

    def recording(self: _MetadataUnpickler, module: str, name: str) -> object:
        named.append((module, name))
        return admit(self, module, name)

    monkeypatch.setattr(_MetadataUnpickler, "find_class", recording)
    ckpt = run / "checkpoints" / "step_000002"
    metadata = read_metadata_file(ckpt / "dcp" / ".metadata")
    assert isinstance(metadata, Metadata) and metadata.state_dict_metadata
    assert ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata") in named, named
    weights = read_full(ckpt / "dcp")
    assert weights and all(isinstance(t, torch.Tensor) for t in weights.values())
    assert not verify(ckpt)[1]


def _find(module: str, name: str) -> object:
    return _MetadataUnpickler(io.BytesIO(b"")).find_class(module, name)


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch", "bfloat16"), ("torch", "float32"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
])
def test_admitted(module: str, name: str) -> None:
    assert _find(module, name) is getattr(sys.modules[module], name)


@pytest.mark.parametrize("module,name", [
    # Classes of DCP modules that the old "any type in torch.distributed.checkpoint.*" rule let through:
    ("torch.distributed.checkpoint.filesystem", "Path"),  # pathlib.Path, imported there
    ("torch.distributed.checkpoint._traverse", "STATE_DICT_ITEM"),  # = object
    ("torch.distributed.checkpoint.filesystem", "FileSystemWriter"),
    (DCP_MODULE, "dist.typing.types.FunctionType"),
    # Dotted names, even into admitted modules and classes:
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
    ("torch", "float32.__class__"), ("pathlib", "PosixPath.touch"), ("torch", "Size.__new__"),
    # Not a dtype / not a metadata module / admitted name under another module:
    ("torch", "Tensor"), ("torch", "load"), ("torch", "strided"), ("torch.serialization", "load"),
    ("torch.distributed.checkpoint.filesystem", "Metadata"), ("typing", "Any"),
    ("builtins", "getattr"), ("builtins", "eval"), ("copyreg", "_reconstructor"), ("os", "system"),
])
def test_refused(module: str, name: str) -> None:
    with pytest.raises(MetadataError, match="refusing to load"):
        _find(module, name)


def test_pathlib_local_spelling_only_where_it_exists() -> None:
    """Python 3.13 pickles paths as pathlib._local.PosixPath: admitted there (the same class), refused where
    that module does not exist."""
    import importlib
    import pathlib

    try:
        local = importlib.import_module("pathlib._local")
    except ImportError:
        with pytest.raises(MetadataError):
            _find("pathlib._local", "PosixPath")
        return
    assert _find("pathlib._local", "PosixPath") is pathlib.PosixPath is local.PosixPath


# ---------------------------------------------------------------------------------------------- model.init_from
def _hf_folder(run: Path, folder: Path) -> tuple[Path, ModelConfig]:
    """The run's weights as a Hugging Face folder with an index and three shards (what a large model has)."""
    weights, manifest = load_model_weights(run / "checkpoints" / "step_000002")
    cfg = parse_section(ModelConfig, manifest.config["model"], "model")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    state = to_hf_state(weights, cfg)
    total = sum(t.numel() * t.element_size() for t in state.values())
    files = write_safetensors(state, folder, max_shard_bytes=total // 3 + 1)
    assert files[-1] == INDEX_FILE and len(files) >= 3, files
    return folder, cfg


def _point(folder: Path, index: dict, shard: str, name: str) -> None:
    """Rewrite the index so that ``shard``'s tensors are read from ``name``."""
    weight_map = {key: name if value == shard else value for key, value in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps({**index, "weight_map": weight_map}))


def test_init_from_reads_no_weight_file_outside_its_folder(run: Path, tmp_path: Path) -> None:
    folder, cfg = _hf_folder(run, tmp_path / "hf")
    good = load_hf_weights(folder, cfg)
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    # A symlink to a file inside the folder is the folder's own file.
    (folder / "alias.safetensors").symlink_to(folder / shard)
    _point(folder, index, shard, "alias.safetensors")
    again = load_hf_weights(folder, cfg)
    assert again.keys() == good.keys() and all(torch.equal(good[k], again[k]) for k in good)

    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / shard, outside)
    (folder / "escape.safetensors").symlink_to(outside)
    for name in ["../outside.safetensors", str(outside), "escape.safetensors"]:
        _point(folder, index, shard, name)
        with pytest.raises(UserError, match="outside") as info:
            load_hf_weights(folder, cfg)
        assert repr(name) in str(info.value) and str(folder) in str(info.value), str(info.value)
    (folder / INDEX_FILE).unlink()
    (folder / "model.safetensors").symlink_to(outside)  # the single-file layout, as a symlink out
    with pytest.raises(UserError, match=r"'model\.safetensors'.*outside"):
        load_hf_weights(folder, cfg)

    _point(folder, index, shard, "../outside.safetensors")  # the CLI: exit 2, one paragraph
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={tmp_path / 'run2'}", *TINY, f"model.init_from={folder}")
    text = _text_of(proc)
    assert proc.returncode == 2 and "'../outside.safetensors'" in text and "outside" in text, text
