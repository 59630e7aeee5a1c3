"""bench/moe.py (MoE vs dense at equal training time): the calibration arithmetic, the schedule each
arm gets, and one end-to-end run at a tiny size (fixed steps, a capped evaluation) that writes the table."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as top-level modules

import equal_time


def test_calibration_times_the_later_half_and_keeps_a_minimum() -> None:
    # The first steps are slow (allocator, caches): only steps after half the calibration count.
    records = [{"step": 2, "step_time_s": 5.0}, {"step": 6, "step_time_s": 1.0}, {"step": 9, "step_time_s": 0.5},
               {"step": 12, "step_time_s": 0.5}]
    steps, step_s = equal_time.calibrated_steps(records, seconds=30.0, calibration_steps=12)
    assert step_s == pytest.approx(0.5) and steps == 60
    assert equal_time.calibrated_steps(records, seconds=30.0, calibration_steps=8)[1] == pytest.approx(2 / 3)
    assert equal_time.calibrated_steps(records, seconds=1.0, calibration_steps=12)[0] == equal_time.MIN_STEPS
    # Training time counts every step of each log window.
    assert equal_time.measured_train_s(records) == pytest.approx(2 * 5.0 + 4 * 1.0 + 3 * 0.5 + 3 * 0.5)


def test_a_run_off_the_budget_is_run_again_at_the_length_its_own_step_time_gives() -> None:
    calls: list[int] = []

    def fake_run(step_s: float) -> Callable[[int], dict[str, float]]:
        def run(steps: int) -> dict[str, float]:
            calls.append(steps)
            return {"train_s": steps * step_s}
        return run

    # 100 steps planned for 90 s took 110 s (1.1 s/step): once more at 81 steps (89.1 s).
    result = equal_time.within_budget(fake_run(1.1), 100, 90.0)
    assert calls == [100, 81] and result["train_s"] == pytest.approx(89.1)
    assert result["retimed_from"] == (100, pytest.approx(110.0))
    note = equal_time.retimed_note([{"name": "a", **result}, {"name": "b", "train_s": 90.0}])
    assert "a (100 steps took 110 s)" in note and "b (" not in note
    # Within 5% (94 s for 90): kept as it is, one run, nothing to note.
    calls.clear()
    kept = equal_time.within_budget(fake_run(0.94), 100, 90.0)
    assert calls == [100] and "retimed_from" not in kept and equal_time.retimed_note([{"name": "x", **kept}]) == ""
    # A run that ran short is lengthened too, and never below the minimum.
    calls.clear()
    equal_time.within_budget(fake_run(0.5), 100, 90.0)
    assert calls == [100, 180]
    calls.clear()
    equal_time.within_budget(fake_run(100.0), 12, 90.0)
    assert calls == [12, equal_time.MIN_STEPS]


def test_each_arm_gets_its_config_schedule_stretched_to_its_steps() -> None:
    from moe import Arm

    arm = Arm("moe", "configs/moe-debug.yaml", ["train.max_steps=200", "train.lr_warmup_steps=30"])
    assert arm.cfg.model.moe is not None and arm.active < arm.params
    assert arm.overrides(100)[-1] == "train.lr_warmup_steps=15"
    assert arm.overrides(2)[-1] == "train.lr_warmup_steps=1"  # at least one, and shorter than the run


TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=2048", "train.micro_batch_size=32", "eval.final_max_batches=2"]


def test_smoke_run_writes_the_table(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "moe.md"
    cmd = [sys.executable, "bench/moe.py", "--steps", "2", "--threads", "1", "--out", str(out)]
    for override in TINY:
        cmd += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = out.read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    assert "dense: training 2 steps" in proc.stdout and "moe: training 2 steps" in proc.stdout  # progress
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith(("| dense ", "| moe "))}
    assert rows.keys() == {"dense", "moe"}, table
    header = [h.strip() for h in table.split("| arm | ")[1].splitlines()[0].split("|")]
    assert header[:7] == ["params", "active params", "steps", "tokens", "train s", "tokens/s", "val bpb"]
    dense, moe = rows["dense"], rows["moe"]
    assert dense[1].endswith("(1.00x)") and dense[6].endswith("(1.00x)")  # the baseline's own ratios
    # 8 experts of 192 (+ router) vs one SwiGLU of 128 at dim 32, beside the untied embedding and output
    # (2 x 4096 x 32): 414,080 / 278,656 parameters.
    assert moe[1].split("(")[1] == "1.49x)"
    assert moe[3].startswith("2 ") and moe[4].startswith("4,096 ")  # 2 steps x 2048 tokens
    for row in (dense, moe):
        bpb = float(row[7].split()[0])
        assert math.isfinite(bpb) and 0 < bpb < 8
    assert "moe - dense = " in table and "at equal steps" in table and "busiest expert" in table
    assert "configs/debug.yaml" in table and "configs/moe-debug.yaml" in table
