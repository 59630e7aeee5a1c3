"""Golden run: 20 deterministic fp32 CPU steps of configs/debug.yaml, losses compared exactly.

Any change that moves these numbers must say why in its commit message. To regenerate after an
intended change: BIGTRAIN_UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import REPO, run_cli

GOLDEN = REPO / "tests" / "golden" / "debug_20_steps.json"
OVERRIDES = ["train.max_steps=20", "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false",
             "checkpoint.at_end=false", "log.sample_at_end=false", "run.num_threads=2", "train.precision=fp32",
             "run.device=cpu", "run.seed=0"]


def test_golden_losses(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "golden"
    proc = run_cli("train", "configs/debug.yaml", f"run.out_dir={out}", *OVERRIDES,
                   env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 20
    if os.environ.get("BIGTRAIN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "configs/debug.yaml", "overrides": OVERRIDES, "losses": losses}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == expected, "\n".join(
        f"step {i + 1}: got {a!r}, golden {b!r}" for i, (a, b) in enumerate(zip(losses, expected)) if a != b)
    assert losses[-1] < losses[0] - 1.0  # and it is learning
