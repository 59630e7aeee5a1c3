"""`bigtrain config check --world-size N` and the launch scripts' check before any rank starts
(issue: hardening §1): a config that does not fit the launch is one message and exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain import cli
from tests.helpers import REPO

BATCH_OF_3 = ["train.global_batch_tokens=768", "data.seq_len=256", "train.micro_batch_size=3"]


@pytest.mark.parametrize("world, overrides, status, words", [
    (1, [], 0, "OK for 1 process (parallel.strategy=single; 24 sequences of 64 per step"),
    (2, ["parallel.strategy=ddp", "train.micro_batch_size=2"], 0,
     "OK for 2 processes (parallel.strategy=ddp; 24 sequences of 64 per step, micro-batch 2, gradient accumulation 6)"),
    (2, [], 2, "parallel.strategy=single runs one process, but this launch has 2 processes"),
    (2, ["parallel.strategy=ddp", *BATCH_OF_3], 2, "3 sequences per step cannot be split over 2 ranks"),
    (4, ["parallel.strategy=fsdp", "parallel.fsdp.replicate_degree=3"], 2,
     "replicate_degree=3 needs a multiple of 3 processes, but there are 4"),
    (0, [], 2, "--world-size must be >= 1"),
])
def test_config_check(capfd: pytest.CaptureFixture[str], world: int, overrides: list[str], status: int,
                      words: str) -> None:
    got = cli.main(["config", "check", "--world-size", str(world), "configs/debug.yaml", *overrides])
    out, err = capfd.readouterr()
    assert got == status and words in (out if status == 0 else err), (out, err)


def test_torchrun_launch_refuses_a_config_that_does_not_fit_before_starting_ranks(tmp_path: Path) -> None:
    env = {**os.environ, "BIGTRAIN_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "configs/debug.yaml",
                           "parallel.strategy=ddp", *BATCH_OF_3, f"run.out_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("cannot be split over 2 ranks") == 1, proc.stderr  # once, not once per rank
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
