"""`bigtrain ckpt ls/verify` on a real run folder (trained in process, once), and resumes from it:
past a corrupt checkpoint, and refused when the architecture changed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bigtrain.errors import UserError
from tests.helpers import build_trainer, cli, overriding, train

TINY = ["model.num_layers=2", "model.dim=64", "data.seq_len=128", "train.global_batch_tokens=1024",
        "train.micro_batch_size=4", "train.max_steps=3", "eval.every_steps=0", "eval.at_end=false",
        "log.sample_at_end=false", "run.device=cpu", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
        "checkpoint.keep_every_steps=1000", "run.num_threads=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _, printed = train(out, *TINY)
    assert "checkpoint" in "\n".join(printed), printed
    return out


def test_ls_and_verify(run_dir: Path) -> None:
    proc = cli("ckpt", "ls", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("step_000003") and "latest" in line for line in lines), proc.stdout
    assert any(line.startswith("step_000002") for line in lines) and not any("step_000001" in x for x in lines)
    proc = cli("ckpt", "verify", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK ") == 2


def test_verify_reports_corruption_by_path(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shard = copy / "checkpoints" / "step_000003" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    proc = cli("ckpt", "verify", str(copy / "checkpoints" / "step_000003"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CORRUPT" in proc.stdout and str(shard) in proc.stdout and "checksum" in proc.stdout
    # Resume skips it with a report and continues from step 2.
    _, printed = train(copy, *overriding(TINY, "checkpoint.resume=auto", "train.max_steps=4"))
    text = "\n".join(printed)
    assert "is corrupt or incomplete" in text and "resumed from" in text
    assert "step_000002 at step 2" in text, text


def test_resume_refuses_changed_architecture(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # A UserError: the CLI prints it and exits 2 without a traceback (the bad-input tables check that path).
    with pytest.raises(UserError) as info:
        build_trainer("configs/debug.yaml", [f"run.out_dir={copy}", *overriding(
            TINY, "checkpoint.resume=auto", "model.dim=128", "model.num_heads=8", "train.lr=1e-3")])
    message = str(info.value)
    assert "model architecture changed" in message
    assert "model.dim: 64 -> 128" in message and "model.num_heads: 4 -> 8" in message


@pytest.mark.parametrize("args", [["ckpt", "ls", "/nonexistent/run"], ["ckpt", "verify", "/nonexistent/ckpt"]])
def test_bad_path_exit_2(args: list[str]) -> None:
    proc = cli(*args)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
