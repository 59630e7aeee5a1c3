"""Golden run: 20 deterministic fp32 CPU steps of configs/debug.yaml, losses compared bit for bit with
tests/golden/debug_20_steps.json, on any x86-64 machine.

CPU kernels differ by instruction set: PyTorch's vectorized ATen kernels and MKL's GEMMs pick
AVX-512 code where the CPU has it, and those round differently from the AVX2 code the golden
losses were recorded with (an AVX-512 machine got 8.175241470336914 at step 2 instead of
8.175240516662598, one float32 ulp, before the pin). So the golden run pins the CPU code paths in
its environment, before torch loads (``GOLDEN_ENV``): ATen's dispatch to AVX2
(``ATEN_CPU_CAPABILITY``), MKL's code branch to AVX2 with conditional numerical reproducibility
(``MKL_CBWR``), oneDNN's ISA to AVX2, and two threads everywhere. With the pin the comparison stays
exact: any change that moves these numbers must say why in its commit message.

To regenerate after an intended change: BIGTRAIN_UPDATE_GOLDEN=1 pytest tests/golden/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli

GOLDEN = REPO / "tests" / "golden" / "debug_20_steps.json"
OVERRIDES = ["train.max_steps=20", "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false",
             "checkpoint.at_end=false", "log.sample_at_end=false", "run.num_threads=2", "train.precision=fp32",
             "run.device=cpu", "run.seed=0"]
# The CPU code paths of the golden run (read at process start: it runs in its own process).
GOLDEN_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def test_golden_losses(tmp_path: Path, demo_data: Path) -> None:
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("the golden losses are recorded with AVX2+FMA CPU kernels; this CPU has no AVX2/FMA to pin them to")
    out = tmp_path / "golden"
    proc = run_cli("train", "configs/debug.yaml", f"run.out_dir={out}", *OVERRIDES, env=GOLDEN_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "threads 2" in proc.stdout, proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 20
    if os.environ.get("BIGTRAIN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "configs/debug.yaml", "overrides": OVERRIDES, "env": GOLDEN_ENV,
                                      "losses": losses}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert len(expected) == len(losses), f"{GOLDEN} has {len(expected)} losses"
    assert losses == expected, "\n".join(
        f"step {i + 1}: got {a!r}, golden {b!r}" for i, (a, b) in enumerate(zip(losses, expected, strict=True))
        if a != b)
    assert losses[-1] < losses[0] - 1.0  # and it is learning


def test_the_pin_reaches_the_kernels() -> None:
    """The golden environment really selects AVX2 in ATen (a misspelt value would be ignored silently)."""
    if "avx2" not in cpu_flags():
        pytest.skip("no AVX2 on this CPU")
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **GOLDEN_ENV})
    assert proc.returncode == 0 and proc.stdout.strip() == "AVX2", proc.stdout + proc.stderr
