"""kill -9 inside a checkpoint save, then `checkpoint.resume=auto`: the previous checkpoint is used and
the run finishes exactly as an uninterrupted one (single process; bit-identical losses and weights).

The process is SIGKILLed by the test hook ``BIGTRAIN_CHECKPOINT_KILL_AT=<point>@<step>`` at three
points of the commit: before the manifest is written, before the folder is renamed to its final
name, and before ``latest`` is replaced. The save at step 2 is committed; the one at step 4 dies.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli
from tests.helpers import train as train_here

ARGS = ["model.num_layers=2", "model.dim=64", "data.seq_len=128", "train.global_batch_tokens=1024",
        "train.micro_batch_size=4", "train.lr_warmup_steps=1", "train.precision=fp32", "log.every_steps=1",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu",
        "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "run.num_threads=2"]


def train(out: Path, *extra: str, env: dict | None = None):
    return run_cli("train", "configs/debug.yaml", f"run.out_dir={out}", *ARGS, *extra, timeout=180, env=env)


def train_in_process(out: Path, *extra: str) -> str:
    """Train in this pytest process (cheaper than a subprocess); returns what it printed."""
    return "\n".join(train_here(out, *ARGS, *extra)[1])


def losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train_in_process(out)
    return out


@pytest.mark.parametrize("point", ["before_manifest", "before_rename", "before_latest"])
def test_kill_inside_save_then_resume_auto(point: str, straight: Path, tmp_path: Path) -> None:
    from bigtrain.checkpoint.manager import load_model_weights

    out = tmp_path / "run"
    killed = train(out, env={"BIGTRAIN_CHECKPOINT_KILL_AT": f"{point}@4"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"

    (out / "metrics.jsonl").write_text("")
    printed = train_in_process(out, "checkpoint.resume=auto")
    assert "resumed from" in printed and "step_000002" in printed, printed
    want, got = losses(straight), losses(out)
    assert sorted(got) == [3, 4]
    assert all(got[s] == want[s] for s in got), (got, want)
    a, _ = load_model_weights(straight / "checkpoints" / "step_000004")
    b, _ = load_model_weights(out / "checkpoints" / "step_000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob("*.tmp")), "the crashed save's folder is cleaned up"


@pytest.mark.parametrize("point", ["after_aside", "before_latest", "before_drop_aside"])
def test_kill_while_resaving_a_committed_step_keeps_it(point: str, straight: Path, tmp_path: Path) -> None:
    """A resume from step 2 of a finished run saves step 4 again: the committed step_000004 is moved aside, never
    deleted first, so a kill at any point of the re-save leaves a committed step 4 that resume=auto takes."""
    import shutil

    from bigtrain.checkpoint.manager import load_model_weights

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    step2 = out / "checkpoints" / "step_000002"
    killed = train(out, f"checkpoint.resume={step2}", env={"BIGTRAIN_CHECKPOINT_KILL_AT": f"{point}@4"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr

    printed = train_in_process(out, "checkpoint.resume=auto")
    assert "resumed from" in printed and "step_000004" in printed, printed
    assert "step_000002" not in printed.split("resumed from", 1)[1].splitlines()[0], printed
    a, _ = load_model_weights(straight / "checkpoints" / "step_000004")
    b, _ = load_model_weights(out / "checkpoints" / "step_000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not list((out / "checkpoints").glob("*.replaced")), "the folder moved aside is cleaned up"
