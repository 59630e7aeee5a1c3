"""Every checkpoint keeps the run's tokenizer (issue 28 §3): ``tokenizer.json`` in the folder, listed and checksummed
in the manifest with its fingerprint and EOS token. ``bigtrain generate`` and ``bigtrain export`` use it from any
working directory, take ``--tokenizer PATH`` only with the same fingerprint, and refuse a different tokenizer at
``data.tokenizer``'s path (older checkpoints) in one line naming both fingerprints. The HF export bundles only a
tokenizer that loads and matches, removes the leftovers of a killed export, and says "No space left on device" in
one line on a full disk, leaving nothing behind.

One tiny run (dim 64, the demo tokenizer) saved at step 0, built once; each test works on a copy of it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bigtrain.checkpoint.manager import verify
from bigtrain.checkpoint.manifest import MANIFEST_FILE, TOKENIZER_FILE, ManifestError, file_crc32, read_manifest
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.export import export_checkpoint
from bigtrain.generate import load_for_generation
from bigtrain.train.status import process_alive
from tests.helpers import REPO, build_trainer, cli

SHAPE = {"vocab_size": 4096, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 128,
         "max_seq_len": 128, "qk_norm": False}
RUN = ["data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.max_steps=1",
       "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "log.console=false", "run.device=cpu",
       "train.precision=fp32", "checkpoint.at_end=false", "run.num_threads=2"]
DATA_TOKENIZER = "data/demo/tokenizer.json"  # configs/debug.yaml's data.tokenizer, relative to the repository


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A run folder whose checkpoint (step 0) was saved by the trainer, in the background (the default; the tokenizer
    file is written by the commit thread, test_export_tokenizer.py's checkpoints are blocking saves)."""
    out = tmp_path_factory.mktemp("tokenizer") / "run"
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out}", *model, *RUN])
    trainer.save_checkpoint(blocking=False)
    trainer.checkpoints.wait()
    return out


@pytest.fixture
def ckpt(saved_run: Path, tmp_path: Path) -> Path:
    """A copy of the saved run's checkpoint folder (tests may damage it)."""
    run = tmp_path / "run"
    shutil.copytree(saved_run / "checkpoints", run / "checkpoints")
    return run / "checkpoints" / "step_000000"


@pytest.fixture
def run_tok(demo_data: Path) -> Tokenizer:
    return Tokenizer.from_file(demo_data / "tokenizer.json")


@pytest.fixture
def other_tok(tmp_path: Path) -> Path:
    """A tokenizer.json that is not the run's: a byte-level BPE retrained on other text, with another vocabulary."""
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    path = tmp_path / "other" / "tokenizer.json"
    Tokenizer.train_bpe_from_iterator(texts, 300).save(path)
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, other_tok: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Another working directory, where data.tokenizer's relative path names a different tokenizer."""
    folder = tmp_path / "elsewhere"
    (folder / DATA_TOKENIZER).parent.mkdir(parents=True)
    shutil.copyfile(other_tok, folder / DATA_TOKENIZER)
    monkeypatch.chdir(folder)
    return folder


def _manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST_FILE).read_text())


def _write_manifest(ckpt: Path, data: dict) -> None:
    (ckpt / MANIFEST_FILE).write_text(json.dumps(data))


def _make_old(ckpt: Path, data_tokenizer: str | None = None) -> None:
    """Turn ``ckpt`` into one saved before checkpoints kept the tokenizer: no copy, no fingerprint recorded."""
    (ckpt / TOKENIZER_FILE).unlink(missing_ok=True)
    data = _manifest(ckpt)
    data.pop("tokenizer", None)
    data["files"].pop(TOKENIZER_FILE, None)
    if data_tokenizer is not None:
        data["config"]["data"]["tokenizer"] = data_tokenizer
    _write_manifest(ckpt, data)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a refusal: exit 2, one line, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return str(proc.stderr)


# ---------------------------------------------------------------------------------------------- the checkpoint
def test_checkpoint_keeps_the_tokenizer(ckpt: Path, run_tok: Tokenizer, demo_data: Path) -> None:
    assert (ckpt / TOKENIZER_FILE).read_bytes() == (demo_data / "tokenizer.json").read_bytes()
    manifest = read_manifest(ckpt)
    assert manifest.tokenizer is not None
    assert manifest.tokenizer.fingerprint == run_tok.fingerprint and manifest.tokenizer.file == TOKENIZER_FILE
    assert manifest.tokenizer.eos_token == run_tok.eos_token
    size, crc = file_crc32(ckpt / TOKENIZER_FILE)
    assert manifest.files[TOKENIZER_FILE] == {"size": size, "crc32": crc}
    assert verify(ckpt) == (manifest, [])
    # The manifest says the checkpoint has one: a deleted copy is a verification problem.
    (ckpt / TOKENIZER_FILE).unlink()
    _, problems = verify(ckpt)
    assert problems and all(TOKENIZER_FILE in p for p in problems), problems


def test_manifest_tokenizer_file_is_only_tokenizer_json(ckpt: Path) -> None:
    data = _manifest(ckpt)
    data["tokenizer"]["file"] = "../../etc/passwd"
    _write_manifest(ckpt, data)
    with pytest.raises(ManifestError, match="tokenizer file"):
        read_manifest(ckpt)


# ---------------------------------------------------------------------------------------------- generate / export
def test_generate_and_export_from_another_folder_use_the_checkpoints_tokenizer(
        ckpt: Path, elsewhere: Path, run_tok: Tokenizer, tmp_path: Path) -> None:
    """From a folder where data.tokenizer names another tokenizer, both use the one saved with the checkpoint."""
    _, tok = load_for_generation(ckpt)
    assert tok.fingerprint == run_tok.fingerprint
    proc = cli("generate", str(ckpt.parent.parent), "--prompt", "ROMEO:", "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr

    proc = cli("export", str(ckpt), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    bundled = Tokenizer.from_file(tmp_path / "hf" / "tokenizer.json")
    assert bundled.backend.get_vocab() == run_tok.backend.get_vocab()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == run_tok.eos_id


def test_a_different_tokenizer_at_data_tokenizer_is_refused(ckpt: Path, elsewhere: Path, run_tok: Tokenizer,
                                                            other_tok: Path, tmp_path: Path) -> None:
    """The checkpoint's copy is gone: data.tokenizer (relative to here) names another tokenizer, refused."""
    (ckpt / TOKENIZER_FILE).unlink(missing_ok=True)
    other = Tokenizer.from_file(other_tok).fingerprint
    for argv in (["generate", str(ckpt)], ["export", str(ckpt), str(tmp_path / "hf")]):
        err = _one_line_error(cli(*argv))
        assert other in err and run_tok.fingerprint in err and "--tokenizer" in err, err
    assert not (tmp_path / "hf").exists()


def test_explicit_tokenizer_right_or_wrong(ckpt: Path, elsewhere: Path, run_tok: Tokenizer, other_tok: Path,
                                           demo_data: Path, tmp_path: Path) -> None:
    right = str(demo_data / "tokenizer.json")
    assert load_for_generation(ckpt, tokenizer=right)[1].fingerprint == run_tok.fingerprint
    assert cli("generate", str(ckpt), "--tokenizer", right, "--max-new-tokens", "2").returncode == 0
    assert cli("export", str(ckpt), str(tmp_path / "hf"), "--tokenizer", right).returncode == 0

    other = Tokenizer.from_file(other_tok).fingerprint
    for argv in (["generate", str(ckpt)], ["export", str(ckpt), str(tmp_path / "hf2")]):
        err = _one_line_error(cli(*argv, "--tokenizer", str(other_tok)))
        assert other in err and run_tok.fingerprint in err, err
    assert not (tmp_path / "hf2").exists()
    err = _one_line_error(cli("generate", str(ckpt), "--tokenizer", str(tmp_path / "missing.json")))
    assert "missing.json does not exist" in err
    err = _one_line_error(cli("export", str(ckpt), "--to", "torch", str(tmp_path / "m.pt"), "--tokenizer", right))
    assert "--to hf only" in err


def test_old_checkpoint_finds_data_tokenizer_from_where_the_run_started(ckpt: Path, elsewhere: Path, tmp_path: Path,
                                                                        run_tok: Tokenizer) -> None:
    """A checkpoint saved before checkpoints kept the tokenizer: data.tokenizer relative to the folder the run was
    started from (run.out_dir relative to it), not to the current folder, which has another tokenizer there."""
    project = tmp_path / "project"
    run = project / "runs" / "old"
    shutil.move(str(ckpt.parent.parent), str(run))
    old = run / "checkpoints" / "step_000000"
    _make_old(old)
    data = _manifest(old)
    data["config"]["run"]["out_dir"] = "runs/old"
    _write_manifest(old, data)
    (project / DATA_TOKENIZER).parent.mkdir(parents=True)
    shutil.copyfile(REPO / DATA_TOKENIZER, project / DATA_TOKENIZER)
    proc = cli("generate", str(run), "--max-new-tokens", "2")
    assert proc.returncode == 0 and "records no tokenizer fingerprint" in proc.stderr, proc.stderr
    assert load_for_generation(run)[1].fingerprint == run_tok.fingerprint
    # Nowhere to be found: one line that says so and what to pass.
    (project / DATA_TOKENIZER).unlink()
    (elsewhere / DATA_TOKENIZER).unlink()
    err = _one_line_error(cli("export", str(run), str(tmp_path / "hf")))
    assert "cannot be found" in err and "--tokenizer" in err
    assert not (tmp_path / "hf").exists()


def test_byte_level_run_has_no_file_but_a_fingerprint(ckpt: Path, demo_data: Path, tmp_path: Path) -> None:
    """data.tokenizer '' (the byte-level fallback): no file to keep, its fingerprint is still checked."""
    byte_level = Tokenizer.byte_level()
    (ckpt / TOKENIZER_FILE).unlink()
    data = _manifest(ckpt)
    data["tokenizer"] = {"fingerprint": byte_level.fingerprint, "eos_token": byte_level.eos_token, "file": None}
    del data["files"][TOKENIZER_FILE]
    data["config"]["data"]["tokenizer"] = ""
    _write_manifest(ckpt, data)
    assert verify(ckpt)[1] == []
    assert load_for_generation(ckpt)[1].fingerprint == byte_level.fingerprint
    proc = cli("export", str(ckpt), str(tmp_path / "hf"))
    assert proc.returncode == 0 and "byte-level fallback" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    err = _one_line_error(cli("generate", str(ckpt), "--tokenizer", str(demo_data / "tokenizer.json")))
    assert byte_level.fingerprint in err


# ---------------------------------------------------------------------------------------------- what export bundles
@pytest.mark.parametrize("where", ["checkpoint", "explicit", "old-config"])
def test_export_refuses_an_empty_tokenizer(where: str, ckpt: Path, tmp_path: Path) -> None:
    """A 0-byte tokenizer.json (the checkpoint's, --tokenizer's, or an old checkpoint's data.tokenizer) is refused:
    exit 2, one line, nothing written."""
    empty = tmp_path / "empty" / "tokenizer.json"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    extra: list[str] = []
    if where == "checkpoint":
        (ckpt / TOKENIZER_FILE).write_bytes(b"")
    elif where == "explicit":
        extra = ["--tokenizer", str(empty)]
    else:
        _make_old(ckpt, data_tokenizer=str(empty))
    out = tmp_path / "out"
    out.mkdir()
    err = _one_line_error(cli("export", str(ckpt), str(out / "hf"), *extra))
    assert "tokenizer" in err
    assert list(out.iterdir()) == []


def test_export_removes_leftovers_of_killed_exports(ckpt: Path, tmp_path: Path) -> None:
    """`.hf.partial-PID` / `.hf.old-PID` of processes that no longer exist are removed with a note; those of a live
    process and other names are left alone. An `.old` one while the target is missing is the previous export
    (killed between its two renames): it is put back, so replacing it again needs --overwrite."""
    out = tmp_path / "out"
    stale = out / ".hf.partial-999999"  # no process has this pid here (the test checks)
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    aside = out / ".hf.old-999998"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    live = out / f".hf.partial-{os.getppid()}"  # an export still running: left alone
    live.mkdir()
    unrelated = [out / ".other.partial-999999", out / ".hf.partial-999999x", out / "hf.partial-999999"]
    for path in unrelated:
        path.mkdir()
    assert not process_alive(999999) and not process_alive(999998)
    proc = cli("export", str(ckpt), str(out / "hf"))
    assert proc.returncode == 2 and "exists and is not empty; pass --overwrite" in proc.stderr, proc.stderr
    assert f"removed {stale}" in proc.stderr and "restored" in proc.stderr and "999998" in proc.stderr
    assert not stale.exists() and not aside.exists() and (out / "hf" / "config.json").read_text() == "{}"
    assert live.exists() and all(p.exists() for p in unrelated)
    proc = cli("export", str(ckpt), str(out / "hf"), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "hf", *(p.name for p in unrelated)])


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(ckpt: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch

    def full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file made it
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    err = _one_line_error(cli("export", str(ckpt), str(out / "deeper" / "hf")))
    assert "No space left on device" in err and "nothing was written" in err
    assert not out.exists()  # neither the target, its partial sibling nor the folders made for it
    with pytest.raises(UserError, match="No space left on device"):
        export_checkpoint(ckpt, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))
