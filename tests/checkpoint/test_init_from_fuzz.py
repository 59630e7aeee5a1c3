"""``model.init_from`` with a malformed Hugging Face folder: one row per malformation, each through the real CLI
(`bigtrain train configs/debug.yaml model.init_from=...`, in-process). Every row must exit 2 with one line that
names the offending file, print no traceback, leave no run folder behind, write nothing into the folder, and not
hang. Also: the HF export gives its weight files the mode of every other file it writes (0o666 & ~umask).

The valid folder is written with bigtrain's own HF writer (``hf_config`` + ``write_safetensors``; test_export.py
checks that format against transformers), so these tests do not need transformers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.hf import (
    INDEX_FILE,
    SAFETENSORS_FILE,
    hf_config,
    load_hf_weights,
    read_safetensors_dir,
    to_hf_state,
    write_safetensors,
)
from bigtrain.errors import UserError
from bigtrain.model import ModelConfig, build_on_meta
from bigtrain.sections import parse_section
from tests.helpers import cli

# A 0.6M-parameter Llama (GQA, untied output) the demo tokenizer fits: a valid folder trains one step in seconds.
SHAPE = {"vocab_size": 4096, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 128,
         "max_seq_len": 64, "tie_embeddings": False, "rope_theta": 10000.0, "norm_eps": 1e-5, "qk_norm": False}
RUN = ["data.seq_len=64", "train.global_batch_tokens=128", "train.micro_batch_size=2", "train.max_steps=1",
       "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "log.console=false", "run.device=cpu",
       "train.precision=fp32", "train.compile=false", "checkpoint.at_end=false", "run.num_threads=2"]
K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # [kv_heads * head_dim, dim] = [32, 64]
HANG_S = 30  # a read that blocks longer than this is a hang (the watchdog then unblocks it and the row fails)


def _overrides(folder: Path, out: Path, *extra: str) -> list[str]:
    replaced = {e.split("=", 1)[0] for e in extra}
    return [f"run.out_dir={out}", *(f"model.{k}={v}" for k, v in SHAPE.items()),
            *(r for r in RUN if r.split("=", 1)[0] not in replaced), *extra, f"model.init_from={folder}"]


def _write_folder(folder: Path, *, sharded: bool) -> Path:
    """A valid HF Llama folder of SHAPE: ``model.safetensors``, or an index and three shards."""
    cfg = ModelConfig(**SHAPE)
    model = build_on_meta(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)
    state = to_hf_state({k: v for k, v in model.state_dict().items() if not k.startswith("rope_")}, cfg)
    total = sum(t.numel() * t.element_size() for t in state.values())
    folder.mkdir(parents=True)
    files = write_safetensors(state, folder, max_shard_bytes=total // 3 + 1 if sharded else total + 1)
    assert (files[-1] == INDEX_FILE and len(files) == 4) if sharded else files == [SAFETENSORS_FILE], files
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"single": _write_folder(root / "single", sharded=False),
            "sharded": _write_folder(root / "sharded", sharded=True)}


# ---------------------------------------------------------------------------------------------- malformations
def _shard(folder: Path, i: int = 1) -> Path:
    return folder / f"model-{i:05d}-of-00003.safetensors"


def _split(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _edit_header(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        file = folder / SAFETENSORS_FILE
        header, data = _split(file)
        edit(header)
        file.write_bytes(_join(json.dumps(header).encode(), data))
    return apply


def _replace_header(header: bytes) -> Callable[[Path], None]:
    """The same tensor data behind another header."""
    def apply(folder: Path) -> None:
        file = folder / SAFETENSORS_FILE
        file.write_bytes(_join(header, _split(file)[1]))
    return apply


def _set_length(length: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        file = folder / SAFETENSORS_FILE
        file.write_bytes(struct.pack("<Q", length) + file.read_bytes()[8:])
    return apply


def _torch_save(folder: Path) -> None:
    """A PyTorch pickle (torch.save's zip) renamed to model.safetensors."""
    from safetensors.torch import load_file

    buffer = io.BytesIO()
    torch.save(load_file(str(folder / SAFETENSORS_FILE)), buffer)
    (folder / SAFETENSORS_FILE).write_bytes(buffer.getvalue())


def _raw_pickle(folder: Path) -> None:
    (folder / SAFETENSORS_FILE).write_bytes(pickle.dumps({K_PROJ: [0.0] * 16}, protocol=4))


def _truncate(folder: Path) -> None:
    file = folder / SAFETENSORS_FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _swap_tensor(file_of: Callable[[Path], Path], name: str, tensor: torch.Tensor) -> Callable[[Path], None]:
    """Rewrite one tensor (a valid safetensors file whose content does not fit the config)."""
    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        file = file_of(folder)
        tensors = load_file(str(file))
        assert name in tensors
        tensors[name] = tensor
        save_file(tensors, str(file), metadata={"format": "pt"})
    return apply


def _duplicate_across_shards(folder: Path) -> None:
    """A tensor of shard 1 also in shard 2 (which copy wins would depend on the reading order)."""
    from safetensors.torch import load_file, save_file

    first, second = load_file(str(_shard(folder, 1))), load_file(str(_shard(folder, 2)))
    name = sorted(first)[0]
    save_file({**second, name: first[name]}, str(_shard(folder, 2)), metadata={"format": "pt"})


def _config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return apply


def _latin1_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "modèle-café"
    (folder / "config.json").write_bytes(json.dumps(config, ensure_ascii=False).encode("latin-1"))


def _index(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        index = json.loads((folder / INDEX_FILE).read_text())
        edit(index)
        (folder / INDEX_FILE).write_text(json.dumps(index))
    return apply


def _point_first_shard_at(name: str) -> Callable[[Path], None]:
    def edit(index: dict) -> None:
        shard = _shard(Path("."), 1).name
        index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    return _index(edit)


def _fifo(name: Callable[[Path], Path]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        target = name(folder)
        target.unlink()
        os.mkfifo(target)
    return apply


def _directory(folder: Path) -> None:
    _shard(folder, 2).unlink()
    _shard(folder, 2).mkdir()


def _self_symlink(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("config.json")


DEEP = "[" * 100_000 + "]" * 100_000


@dataclass(frozen=True)
class Row:
    id: str
    layout: str  # "single" (model.safetensors) or "sharded" (index + 3 shards)
    break_it: Callable[[Path], None]
    names: str  # the file the message must name
    needle: str = ""  # and, where given, this (lower-case) part of the problem


ROWS = [
    # safetensors headers
    Row("st-huge-header-length", "single", _set_length(2**62), SAFETENSORS_FILE, "header"),
    Row("st-header-length-past-end", "single", _set_length(50_000_000), SAFETENSORS_FILE, "header length"),
    Row("st-non-utf8-header", "single", _replace_header(b"\xff\xfe" + b"\xe9" * 30), SAFETENSORS_FILE, "utf-8"),
    Row("st-header-not-json", "single", _replace_header(b"this is not json at all"), SAFETENSORS_FILE),
    Row("st-header-json-list", "single", _replace_header(b"[1, 2, 3]"), SAFETENSORS_FILE),
    Row("st-header-deeply-nested", "single", _replace_header(('{"x": ' + DEEP + "}").encode()), SAFETENSORS_FILE),
    Row("st-unknown-dtype", "single", _edit_header(lambda h: h[K_PROJ].update(dtype="Q9")), SAFETENSORS_FILE),
    Row("st-offsets-out-of-range", "single",
        _edit_header(lambda h: h[K_PROJ].update(data_offsets=[0, 10**9])), SAFETENSORS_FILE),
    Row("st-pickle-renamed-torch-save", "single", _torch_save, SAFETENSORS_FILE, "pickle"),
    Row("st-pickle-renamed-raw", "single", _raw_pickle, SAFETENSORS_FILE, "pickle"),
    Row("st-truncated", "single", _truncate, SAFETENSORS_FILE, "truncated"),
    Row("st-empty", "single", _write(SAFETENSORS_FILE, b""), SAFETENSORS_FILE, "empty"),
    Row("st-three-bytes", "single", _write(SAFETENSORS_FILE, b"\x10\x00\x00"), SAFETENSORS_FILE, "too short"),
    Row("st-fifo", "single", _fifo(lambda f: f / SAFETENSORS_FILE), SAFETENSORS_FILE, "not a regular file"),
    # tensors that do not fit config.json
    Row("tensor-wrong-shape", "single", _swap_tensor(lambda f: f / SAFETENSORS_FILE, K_PROJ, torch.zeros(64, 64)),
        SAFETENSORS_FILE, "shape"),
    Row("tensor-wrong-shape-in-shard", "sharded",
        _swap_tensor(lambda f: _shard(f, 1), "lm_head.weight", torch.zeros(4096, 32)), _shard(Path("."), 1).name,
        "shape"),
    Row("tensor-wrong-dtype-int", "single",
        _swap_tensor(lambda f: f / SAFETENSORS_FILE, K_PROJ, torch.zeros(32, 64, dtype=torch.int64)),
        SAFETENSORS_FILE, "int64"),
    Row("tensor-wrong-dtype-bool", "single",
        _swap_tensor(lambda f: f / SAFETENSORS_FILE, K_PROJ, torch.zeros(32, 64, dtype=torch.bool)),
        SAFETENSORS_FILE, "bool"),
    Row("tensor-in-two-shards", "sharded", _duplicate_across_shards, _shard(Path("."), 2).name, "both"),
    # config.json
    Row("config-invalid-json", "single", _write("config.json", '{"vocab_size": 4096,'), "config.json", "json"),
    Row("config-json-list", "single", _write("config.json", "[1, 2, 3]"), "config.json", "object"),
    Row("config-json-string", "single", _write("config.json", '"llama"'), "config.json", "object"),
    Row("config-latin1-bytes", "single", _latin1_config, "config.json", "utf-8"),
    Row("config-empty", "single", _write("config.json", b""), "config.json", "empty"),
    Row("config-deeply-nested", "single", _write("config.json", '{"x": ' + DEEP + "}"), "config.json", "nested"),
    Row("config-self-symlink", "single", _self_symlink, "config.json"),
    Row("config-fifo", "single", _fifo(lambda f: f / "config.json"), "config.json"),
    Row("config-null-size", "single", _config(lambda c: c.update(hidden_size=None)), "config.json", "hidden_size"),
    Row("config-missing-size", "single", _config(lambda c: c.pop("num_hidden_layers")), "config.json",
        "num_hidden_layers"),
    Row("config-string-size", "single", _config(lambda c: c.update(hidden_size="sixty-four")), "config.json",
        "hidden_size"),
    Row("config-numeric-string-size", "single", _config(lambda c: c.update(num_attention_heads="4")),
        "config.json", "num_attention_heads"),
    Row("config-float-size", "single", _config(lambda c: c.update(intermediate_size=128.5)), "config.json",
        "intermediate_size"),
    Row("config-zero-heads", "single", _config(lambda c: c.update(num_attention_heads=0)), "config.json",
        "num_attention_heads"),
    Row("config-bool-size", "single", _config(lambda c: c.update(vocab_size=True)), "config.json", "vocab_size"),
    Row("config-huge-int", "single", _write("config.json", '{"vocab_size": 1' + "0" * 5000 + "}"), "config.json"),
    Row("config-nan-rope-theta", "single", _write("config.json", json.dumps(hf_config(ModelConfig(**SHAPE)))
                                                  .replace('"rope_theta": 10000.0', '"rope_theta": NaN')),
        "config.json", "rope_theta"),
    Row("config-string-bool", "single", _config(lambda c: c.update(tie_word_embeddings="false")), "config.json",
        "tie_word_embeddings"),
    Row("config-model-type-list", "single", _config(lambda c: c.update(model_type=["llama"])), "config.json",
        "model_type"),
    Row("config-rope-scaling-list", "single", _config(lambda c: c.update(rope_scaling=["linear", 2.0])),
        "config.json", "rope_scaling"),
    # model.safetensors.index.json
    Row("index-no-weight-map", "sharded", _index(lambda i: i.pop("weight_map")), INDEX_FILE, "weight_map"),
    Row("index-weight-map-list", "sharded", _index(lambda i: i.update(weight_map=[_shard(Path("."), 1).name])),
        INDEX_FILE, "weight_map"),
    Row("index-weight-map-int-values", "sharded", _index(lambda i: i.update(weight_map={K_PROJ: 1})), INDEX_FILE,
        "weight_map"),
    Row("index-weight-map-nested", "sharded",
        _index(lambda i: i.update(weight_map={K_PROJ: {"file": _shard(Path("."), 1).name}})), INDEX_FILE,
        "weight_map"),
    Row("index-weight-map-empty", "sharded", _index(lambda i: i.update(weight_map={})), INDEX_FILE, "weight_map"),
    Row("index-json-list", "sharded", _write(INDEX_FILE, "[]"), INDEX_FILE),
    Row("index-latin1-bytes", "sharded", _write(INDEX_FILE, '{"weight_map": {"é": "x"}}'.encode("latin-1")),
        INDEX_FILE, "utf-8"),
    Row("index-empty", "sharded", _write(INDEX_FILE, b""), INDEX_FILE, "empty"),
    Row("index-deeply-nested", "sharded", _write(INDEX_FILE, '{"weight_map": ' + DEEP + "}"), INDEX_FILE,
        "nested"),
    Row("index-names-itself", "sharded", _point_first_shard_at(INDEX_FILE), INDEX_FILE, "itself"),
    Row("index-names-config", "sharded", _point_first_shard_at("config.json"), "config.json", "not a .safetensors"),
    Row("index-names-a-pickle", "sharded", _point_first_shard_at("pytorch_model.bin"), "pytorch_model.bin"),
    Row("index-null-byte-in-name", "sharded", _point_first_shard_at("model\x00.safetensors"), INDEX_FILE),
    Row("index-fifo", "sharded", _fifo(lambda f: f / INDEX_FILE), INDEX_FILE, "not a regular file"),
    Row("index-weight-file-missing", "sharded", lambda f: _shard(f, 2).unlink(), _shard(Path("."), 2).name,
        "missing"),
    Row("index-weight-file-directory", "sharded", _directory, _shard(Path("."), 2).name),
    Row("index-weight-file-fifo", "sharded", _fifo(lambda f: _shard(f, 3)), _shard(Path("."), 3).name),
    Row("index-weight-file-empty", "sharded", _write(_shard(Path("."), 2).name, b""), _shard(Path("."), 2).name,
        "empty"),
]


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry with its size and modification time (lstat: a FIFO is not opened, a link not followed)."""
    out = {}
    for path in folder.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


_UNBLOCK = """
import os, stat, sys, time
folder, marker = sys.argv[1], sys.argv[2]
time.sleep(float(sys.argv[3]))
for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if stat.S_ISFIFO(os.lstat(path).st_mode):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: nobody is reading it
        except OSError:
            continue
        open(marker, "w").close()  # someone was blocked reading it
"""


@contextlib.contextmanager
def _watchdog(folder: Path, marker: Path) -> Iterator[None]:
    """Where ``folder`` holds a FIFO: after HANG_S, a helper process opens each for writing and closes it, so a
    reader stuck on one sees end-of-file and the row fails (``marker`` is created) instead of the session
    hanging. (A thread or SIGALRM would not do: a read blocked inside safetensors' Rust code holds the GIL.)"""
    if not any(stat.S_ISFIFO(p.lstat().st_mode) for p in folder.iterdir()):
        yield
        return
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(folder), str(marker), str(HANG_S)])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_malformed_folder_is_one_line_exit_2(row: Row, folders: dict[str, Path], tmp_path: Path,
                                             demo_data: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(folders[row.layout], folder)
    row.break_it(folder)
    before = _listing(folder)
    out, hung = tmp_path / "run", tmp_path / "hung"
    with _watchdog(folder, hung):
        proc = cli("train", "configs/debug.yaml", *_overrides(folder, out))
    text = proc.stdout + proc.stderr
    assert not hung.exists(), f"blocked on a read for {HANG_S}s:\n{text}"
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain: error:")]
    assert len(errors) == 1, proc.stderr
    # One line: the error is the last thing printed, with nothing (a second paragraph, a traceback) after it.
    assert proc.stderr.rstrip("\n").endswith(errors[0]), proc.stderr
    message = errors[0]
    assert row.names in message, message
    assert row.needle.lower() in message.lower(), message
    assert len(message) < 600, message
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # a failed start leaves no run folder
    assert _listing(folder) == before  # and writes nothing into the folder it read


@pytest.fixture(scope="module")
def trained_run(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The valid folder trains (so each row fails for its malformation), and leaves a checkpoint to export."""
    out = tmp_path_factory.mktemp("valid") / "run"
    proc = cli("train", "configs/debug.yaml", *_overrides(folders["sharded"], out, "checkpoint.at_end=true"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "initialized weights from" in proc.stdout + proc.stderr
    return out


def test_valid_folders_train(trained_run: Path, folders: dict[str, Path], tmp_path: Path) -> None:
    assert (trained_run / "checkpoints").is_dir()
    proc = cli("train", "configs/debug.yaml", *_overrides(folders["single"], tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_half_precision_and_nested_metadata_load(folders: dict[str, Path], tmp_path: Path) -> None:
    """What is not malformed still loads: bf16/fp16 weights, and a config with extra (nested, odd) keys."""
    folder = tmp_path / "hf"
    shutil.copytree(folders["single"], folder)
    tensors = read_safetensors_dir(folder)
    half = {k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(sorted(tensors.items()))}
    (folder / SAFETENSORS_FILE).unlink()
    write_safetensors(half, folder)
    _config(lambda c: c.update(quantization_config=None, task_specific_params={"a": [[1], {"b": None}]},
                               num_key_value_heads=2, head_dim=None, rope_scaling=None))(folder)
    weights = load_hf_weights(folder, ModelConfig(**SHAPE))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["layers.0.attn.wk.weight"], half[K_PROJ].float())


def test_header_length_that_looks_like_a_pickle_is_read(tmp_path: Path) -> None:
    """A header of 0x480 bytes starts the file with 80 04, a pickle's protocol-4 opcode: still safetensors."""
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4.0)}, str(tmp_path / "plain.safetensors"))
    header, data = _split(tmp_path / "plain.safetensors")
    text = json.dumps(header).encode()
    (tmp_path / SAFETENSORS_FILE).write_bytes(_join(text + b" " * (0x480 - len(text)), data))
    assert (tmp_path / SAFETENSORS_FILE).read_bytes()[:2] == b"\x80\x04"
    assert torch.equal(read_safetensors_dir(tmp_path)["w"], torch.arange(4.0))


def test_moe_fused_experts_of_the_wrong_rank_are_named(tmp_path: Path) -> None:
    """transformers 5's fused expert layout: a gate_up_proj that cannot be split is one line, not an IndexError."""
    cfg = parse_section(ModelConfig, {**SHAPE, "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 32}}, "model")
    model = build_on_meta(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)
    state = to_hf_state({k: v for k, v in model.state_dict().items() if not k.startswith("rope_")}, cfg)
    state = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(SHAPE["num_layers"]):
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.zeros(4 * 2 * 32 * 64)  # flattened: 1-D
        state[f"model.layers.{i}.mlp.experts.down_proj"] = model.state_dict()[f"layers.{i}.ffn.experts.w2"]
    (tmp_path / "hf").mkdir()
    write_safetensors(state, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(cfg)))
    with pytest.raises(UserError, match=r"model\.safetensors.*gate_up_proj.*shape") as info:
        load_hf_weights(tmp_path / "hf", cfg)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- export file modes
@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(mask: int) -> int:
        os.umask(mask)
        return 0o666 & ~mask

    yield set_umask
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


def test_export_weight_files_have_the_mode_of_the_other_files(trained_run: Path, tmp_path: Path,
                                                              umask: Callable[[int], int]) -> None:
    expected = umask(0o022)
    proc = cli("export", str(trained_run), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modes = _modes(tmp_path / "hf")
    assert SAFETENSORS_FILE in modes and "config.json" in modes, modes
    assert modes[SAFETENSORS_FILE] == modes["config.json"] == expected, {k: oct(v) for k, v in modes.items()}


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
@pytest.mark.parametrize("sharded", [False, True])
def test_write_safetensors_respects_the_umask(mask: int, sharded: bool, tmp_path: Path,
                                              umask: Callable[[int], int]) -> None:
    expected = umask(mask)
    tensors = {f"w{i}": torch.randn(16, 16) for i in range(4)}
    files = write_safetensors(tensors, tmp_path, max_shard_bytes=2 * 16 * 16 * 4 if sharded else 1 << 30)
    assert len(files) == (3 if sharded else 1), files
    (tmp_path / "config.json").write_text("{}")
    modes = _modes(tmp_path)
    assert set(modes.values()) == {expected}, {k: oct(v) for k, v in modes.items()}
