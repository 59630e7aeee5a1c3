"""Non-finite policy (train.on_nonfinite) on one process, end to end through `bigtrain train`
(``bigtrain.cli.main`` in this process: exit status, messages, run folder).

`train.debug_poison_steps` multiplies the loss by NaN at the listed steps (a testing aid).
Ctrl-C (a real signal to a real process) is tests/e2e/test_ctrl_c.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, cli, status, train_losses

# A tiny, fast variant of the debug run (one process).
TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1", "train.precision=fp32",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu", "run.num_threads=1"]


def checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_stop_policy_exits_3_without_saving_a_poisoned_checkpoint(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "stop"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={out}", *TINY, "train.max_steps=6",
               "log.every_steps=5", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
               "train.debug_poison_steps=[3]")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "non-finite loss or gradient norm at step 3" in proc.stderr and "Traceback" not in proc.stderr
    # Step 2 was saved; the save at step 4 (weights already NaN) was refused; nothing after.
    assert checkpoints(out) == ["step_000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert status(out)["status"] == "failed"


def test_skip_policy_drops_bad_steps(tmp_path: Path, demo_data: Path) -> None:
    """(Stopping after train.max_consecutive_skips in a row is covered by tests/train/test_step_policies.py.)"""
    out = tmp_path / "skip"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={out}", *TINY, "train.max_steps=5", "log.every_steps=1",
               "train.on_nonfinite=skip", "train.debug_poison_steps=[2,3]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = train_losses(out)
    assert [s for s, v in losses.items() if v != v] == [2, 3]  # NaN logged for the skipped steps
    assert all(v == v for s, v in losses.items() if s not in (2, 3))  # the weights were never touched by them
    assert "step 3: non-finite loss or gradient norm, update skipped (2 in a row, 2 in total)" in proc.stdout
    assert checkpoints(out) == ["step_000005"]  # the final checkpoint is written (finite weights)


def test_nonfinite_bad_config_is_a_user_error(tmp_path: Path) -> None:
    from bigtrain.config import ConfigError, load_config

    for override, needle in [("train.max_consecutive_skips=0", "train.max_consecutive_skips"),
                             ("train.on_nonfinite=sometimes", "on_nonfinite"),
                             ("train.debug_poison_steps=[0]", "train.debug_poison_steps")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(REPO / "configs/debug.yaml", [override])
    # The CLI turns it into status 2 and one paragraph (no traceback).
    proc = cli("config", "show", "configs/debug.yaml", "train.on_nonfinite=skip", "parallel.strategy=zero",
               "train.optimizer=adamw")
    assert proc.returncode == 2 and "train.on_nonfinite" in proc.stderr and "stop" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
