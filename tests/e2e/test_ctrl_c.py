"""Ctrl-C (SIGINT) to a real one-process `bigtrain train`: finish the step, save, status preempted, exit 130."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO

# A tiny, fast variant of the debug run (one process).
TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1", "train.precision=fp32",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu", "run.num_threads=1"]


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


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
