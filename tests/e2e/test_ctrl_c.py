"""Ctrl-C (SIGINT) to a real one-process `bigtrain train`: finish the step, save, status preempted, exit 130."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, status, train_losses

# A tiny, fast variant of the debug run (one process).
TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1", "train.precision=fp32",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu", "run.num_threads=1"]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if (run_dir / "metrics.jsonl").is_file() and max(train_losses(run_dir) or [0]) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_ctrl_c_saves_and_exits_cleanly(tmp_path: Path, demo_data: Path) -> None:
    """SIGINT (Ctrl-C) in a debug run: finish the step, save, status preempted, exit 130, no traceback."""
    out = tmp_path / "ctrl-c"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", "configs/debug.yaml", f"run.out_dir={out}",
                             *TINY, "train.max_steps=100000", "log.every_steps=1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        log = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, log
    assert "Traceback" not in log and "received SIGINT" in log, log
    st = status(out)
    assert st["status"] == "preempted" and st["signal"] == "SIGINT", st
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved == st["step"] >= 2 and saved == max(train_losses(out))


# The final phase: 4 steps, then the final checkpoint, then a final evaluation made long on purpose (the whole
# train split as validation data: tens of seconds) so that the signals below arrive inside it.
FINAL_PHASE = ["train.max_steps=4", "log.every_steps=1", "eval.at_end=true", "eval.final_max_batches=0",
               "data.val_path=data/demo/train"]


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a for a in TINY if not a.startswith("eval.at_end=")]
    return subprocess.Popen([sys.executable, "-m", "bigtrain", "train", "configs/debug.yaml", f"run.out_dir={out}",
                             *args, *FINAL_PHASE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_final_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the final save (step 4) is committed: the final evaluation starts right after it."""
    deadline = time.monotonic() + timeout
    latest = out / "checkpoints" / "latest"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if latest.is_file() and latest.read_text().strip() == "step_000004":
            return
        time.sleep(0.05)
    raise AssertionError(f"no final checkpoint within {timeout}s")


def _assert_final_checkpoint_committed(out: Path) -> None:
    from bigtrain.checkpoint.manager import verify

    ckpt = out / "checkpoints" / "step_000004"
    manifest, problems = verify(ckpt)
    assert manifest is not None and manifest.step == 4 and not problems, problems


def test_sigterm_in_the_final_evaluation_with_a_grace_period(tmp_path: Path, demo_data: Path) -> None:
    """A scheduler's SIGTERM after the last step, SIGKILL 3 s later: the final checkpoint was committed before the
    evaluation started, the evaluation stops at its next batch, status says preempted, exit 75 within the grace."""
    out = tmp_path / "term"
    proc = _start(out)
    try:
        _wait_for_final_checkpoint(out, proc)
        proc.send_signal(signal.SIGTERM)
        try:
            log = proc.communicate(timeout=3)[0]
        except subprocess.TimeoutExpired:
            proc.kill()  # the grace period is over
            log = proc.communicate()[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, log
    assert "bigtrain: SIGTERM: stopping after this step and saving a checkpoint" in log, log
    assert "final evaluation abandoned at step 4" in log and "Traceback" not in log, log
    _assert_final_checkpoint_committed(out)
    st = status(out)
    assert st["status"] == "preempted" and st["signal"] == "SIGTERM" and st["step"] == 4, st


def test_ctrl_c_twice_in_the_final_evaluation_keeps_the_checkpoint(tmp_path: Path, demo_data: Path) -> None:
    """The first Ctrl-C is acknowledged at once; the second aborts (or, when the first already ended the run, meets
    the exiting process): either way the final checkpoint is committed and the status is not left running."""
    out = tmp_path / "int2"
    proc = _start(out)
    try:
        _wait_for_final_checkpoint(out, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        log = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode in (130, -signal.SIGINT), log
    assert "press Ctrl-C again to abort without saving" in log, log
    _assert_final_checkpoint_committed(out)
    assert status(out)["status"] != "running", status(out)
