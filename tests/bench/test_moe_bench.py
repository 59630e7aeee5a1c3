"""bench/moe.py (MoE vs dense at equal training time): the calibration arithmetic, the schedule each
arm gets, and one end-to-end run at a tiny size (fixed steps, a capped evaluation) that writes the table."""
from __future__ import annotations

import math
import os
import re
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


def parse_cell(text: str) -> tuple[float, float | None]:
    """A table cell such as ``0.41M (1.49x)``, ``4,096 (1.00x)``, ``4.0314 (-0.0264)`` or ``1.1``:
    (the value, in millions for a parameter count; the bracketed ratio or difference, or None)."""
    m = re.fullmatch(r"([-+]?[\d,]+(?:\.\d+)?)M?(?: \(([-+]?\d+\.\d+)x?\))?", text.strip())
    assert m, f"not a number cell: {text!r}"
    return float(m.group(1).replace(",", "")), None if m.group(2) is None else float(m.group(2))


def parse_table(table: str) -> dict[str, dict[str, tuple[float, float | None]]]:
    """arm -> column -> parse_cell of its row in the markdown table."""
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| arm |"))
    header = [h.strip() for h in lines[at].strip("|").split("|")]
    rows = {}
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = {col: parse_cell(c) for col, c in zip(header[1:], cells[1:], strict=True)}
    return rows


def close(got: float, want: float, tol: float) -> bool:
    return math.isfinite(got) and abs(got - want) <= tol


def test_smoke_run_writes_the_table(tmp_path: Path, demo_data: Path) -> None:
    from moe import Arm

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
    assert "configs/debug.yaml" in table and "configs/moe-debug.yaml" in table

    rows = parse_table(table)
    assert rows.keys() == {"dense", "moe"}, table
    assert list(rows["dense"]) == ["params", "active params", "steps", "tokens", "train s", "tokens/s", "val bpb"]
    dense, moe = rows["dense"], rows["moe"]

    # Parameter counts against the arms' own configs: 8 experts of 192 (+ router) vs one SwiGLU of 128 at
    # dim 32, beside the untied embedding and output (2 x 4096 x 32).
    arms = {name: Arm(name, config, TINY) for name, config in (("dense", "configs/debug.yaml"),
                                                                ("moe", "configs/moe-debug.yaml"))}
    assert (arms["dense"].params, arms["moe"].params) == (278_656, 414_080)
    for column, attr in (("params", "params"), ("active params", "active")):
        counts = {name: getattr(arm, attr) for name, arm in arms.items()}
        for name in rows:
            assert close(rows[name][column][0], counts[name] / 1e6, 0.005), (column, name, rows[name][column])
        assert close(moe[column][1], counts["moe"] / counts["dense"], 0.005), (column, moe[column], counts)
    assert moe["active params"][1] < moe["params"][1]  # the experts add parameters, not compute per token

    # Steps and tokens: 2 steps x 2048 tokens for each arm.
    for row in (dense, moe):
        assert row["steps"][0] == 2 and row["tokens"][0] == 2 * 2048, row
    # Training time and throughput: positive, finite, and tokens/s is tokens / train s (rounded to 0.1 s).
    for row in (dense, moe):
        tokens, train_s, tps = row["tokens"][0], row["train s"][0], row["tokens/s"][0]
        assert math.isfinite(train_s) and train_s >= 0 and math.isfinite(tps) and tps > 0, row
        assert tokens / (train_s + 0.05) - 0.5 <= tps, row
        assert train_s <= 0.05 or tps <= tokens / (train_s - 0.05) + 0.5, row

    # Every ratio is the arm's value over the dense arm's (the baseline's own is 1.00x), within rounding.
    for column in ("params", "active params", "steps", "tokens", "tokens/s"):
        assert dense[column][1] == 1.0, (column, dense[column])
        ratio = moe[column][1]
        assert ratio is not None and math.isfinite(ratio) and ratio > 0, (column, moe[column])
    for column in ("steps", "tokens"):  # exact integers: the ratio is exact up to its 2 decimals
        assert close(moe[column][1], moe[column][0] / dense[column][0], 0.005), (column, moe[column])
    # tokens/s is rounded to whole tokens: allow that on both sides of the quotient.
    tps_ratio = moe["tokens/s"][0] / dense["tokens/s"][0]
    slack = 0.005 + tps_ratio * (0.5 / moe["tokens/s"][0] + 0.5 / dense["tokens/s"][0])
    assert close(moe["tokens/s"][1], tps_ratio, slack), (moe["tokens/s"], dense["tokens/s"])

    # val bpb: finite and plausible for a 2-step byte-level model; for it the bracket is the difference.
    for row in (dense, moe):
        assert math.isfinite(row["val bpb"][0]) and 0 < row["val bpb"][0] < 8, row
    assert dense["val bpb"][1] == 0.0
    diff = moe["val bpb"][0] - dense["val bpb"][0]
    assert close(moe["val bpb"][1], diff, 1.5e-4), (moe["val bpb"], dense["val bpb"])
    # The progress line of each arm printed the same score.
    printed = [float(x) for x in re.findall(r"^  (\d+\.\d{4}) bpb, ", proc.stdout, re.M)]
    assert printed == [dense["val bpb"][0], moe["val bpb"][0]], proc.stdout

    # The summary below the table repeats the same numbers.
    m = re.search(r"moe - dense = ([-+]\d+\.\d{4}) bpb at equal steps; moe trains at (\d+\.\d{2})x dense's "
                  r"tokens/s with (\d+\.\d{2})x its active and (\d+\.\d{2})x its total parameters", table)
    assert m, table
    assert float(m.group(1)) == moe["val bpb"][1]
    assert float(m.group(2)) == moe["tokens/s"][1]
    assert float(m.group(3)) == moe["active params"][1] and float(m.group(4)) == moe["params"][1]
    busiest = re.search(r"busiest expert (\d+\.\d{2})x the mean load", table)
    assert busiest, table
    # max / mean expert load: at least 1, at most num_experts / top_k = 4 (a token picks an expert once).
    assert 1.0 <= float(busiest.group(1)) <= 4.0, busiest.group(0)
