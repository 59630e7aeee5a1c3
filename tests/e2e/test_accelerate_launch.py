"""`accelerate launch` starts bigtrain like torchrun: 2 CPU processes with RANK/WORLD_SIZE/MASTER_ADDR set.

accelerate's CPU mode (`--cpu`) starts ONE process (or mpirun with a hostfile); the torchrun-like
launcher is its MULTI_GPU mode, which also works without GPUs (bigtrain picks gloo on the CPU).
A tiny config file keeps the launch hermetic: no prompt and no user default config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, run_distributed, train, train_records

pytest.importorskip("accelerate")

TRAIN = ["train", "configs/debug.yaml", "parallel.strategy=ddp", "train.max_steps=2", "train.micro_batch_size=2",
         "train.lr_warmup_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.every_steps=1",
         "log.sample_at_end=false", "checkpoint.every_steps=0", "checkpoint.at_end=false", "run.num_threads=1"]



def _accelerate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\nrdzv_backend: static\nsame_network: true\n"
        f"main_process_port: {free_port()}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_accelerate_sets_the_env_bigtrain_reads(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os\nfrom bigtrain.parallel.dist import env_world\n"
        "print('ENV', json.dumps({'world': env_world(), 'addr': os.environ.get('MASTER_ADDR'),"
        " 'port': os.environ.get('MASTER_PORT')}))\n"
    )
    proc = _accelerate(tmp_path, str(probe))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ENV ")]
    assert sorted(tuple(s["world"]) for s in seen) == [(0, 0, 2), (1, 1, 2)]
    assert all(s["addr"] and s["port"] for s in seen)


def _train_ddp(rank: int, out: str) -> None:
    train(Path(out), *TRAIN[2:])  # TRAIN without the verb and the config


def test_accelerate_launch_trains_ddp_like_torchrun(tmp_path: Path, demo_data: Path) -> None:
    acc_dir, ref_dir = tmp_path / "acc", tmp_path / "ranks"
    proc = _accelerate(tmp_path, "-m", "bigtrain", *TRAIN, f"run.out_dir={acc_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device   cpu x 2, strategy ddp" in proc.stdout and "done: 2 steps" in proc.stdout
    # The same run in 2 ranks started with the torchrun environment (tests/helpers.py run_distributed).
    run_distributed(_train_ddp, 2, str(ref_dir), timeout_s=300)

    def losses(run_dir: Path) -> list[float]:
        return [r["loss"] for r in train_records(run_dir)]

    assert losses(acc_dir) == losses(ref_dir) and len(losses(acc_dir)) == 2
