"""Two gloo ranks started by hand (no torchrun, so nothing but bigtrain reacts): signals and dead/hung ranks.

* SIGUSR1 to one rank only: both agree on the stop step (all-reduce of the stop flag), checkpoint
  once and exit 75.
* SIGKILL one rank: the other exits non-zero quickly, naming itself, the failed collective and the
  silent peer.
* SIGSTOP one rank (a hang): the other exits non-zero within parallel.timeout_s, naming the peer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port

TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1", "train.precision=fp32",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu", "log.every_steps=1",
        "parallel.strategy=ddp", "log.console=false"]
TIMEOUT_S = 12  # parallel.timeout_s for these runs (the hang test waits this long)



def start_ranks(out: Path, *overrides: str, world: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bigtrain", "train", "configs/debug.yaml", f"run.out_dir={out}", *TINY, *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, p.communicate()[0]
        if last_step(run_dir) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_usr1_to_one_rank_stops_both_at_the_same_step(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "run"
    procs = start_ranks(out, "train.max_steps=100000", f"parallel.timeout_s={TIMEOUT_S}")
    try:
        wait_for_step(out, 2, procs)
        procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told; rank 0 learns it from the all-reduce
    finally:
        logs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [75, 75], "\n".join(logs)
    assert "received SIGUSR1" in logs[1] and "received" not in logs[0]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGUSR1"
    stopped = status["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}"
    assert last_step(out) == stopped  # no rank ran a step past the agreed one
    # (Resuming from it, on a real Slurm with requeue, is tests/e2e/test_slurm.py.)


@pytest.mark.slow
def test_other_rank_exits_nonzero_within_the_timeout(tmp_path: Path, demo_data: Path) -> None:
    """Two 2-rank runs side by side (to share the start-up time): rank 1 of one is killed, of the other stopped."""
    runs = {how: start_ranks(tmp_path / how, "train.max_steps=100000", f"parallel.timeout_s={TIMEOUT_S}")
            for how in ("killed", "hung")}
    logs, elapsed = {}, {}
    try:
        for how, procs in runs.items():
            wait_for_step(tmp_path / how, 2, procs)
        t0 = time.monotonic()
        os.kill(runs["killed"][1].pid, signal.SIGKILL)
        os.kill(runs["hung"][1].pid, signal.SIGSTOP)  # alive but silent: a hang
        for how in ("killed", "hung"):
            logs[how] = runs[how][0].communicate(timeout=TIMEOUT_S + 60)[0]
            elapsed[how] = time.monotonic() - t0
    finally:
        for procs in runs.values():
            for p in procs:  # SIGKILL also ends a stopped process
                p.kill()
                p.communicate()
    for how, log in logs.items():
        assert runs[how][0].returncode not in (0, None), log
        assert elapsed[how] < TIMEOUT_S + 15, (
            f"{how}: rank 0 took {elapsed[how]:.0f}s to exit (timeout {TIMEOUT_S}s)\n{log}")
        assert "bigtrain: rank 0 of 2" in log, log  # names itself ...
        assert "another rank" in log, log  # ... says what probably happened
        assert "Traceback" in log or "Stacks of this rank" in log, log  # ... and where it was
        # ... and which peer went silent, from the heartbeats in the launcher's store (train/peers.py).
        assert "bigtrain: rank 0 of 2: rank 1 (host " in log and "is silent: last heard" in log, log
