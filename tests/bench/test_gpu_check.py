"""bench/gpu_check.py --smoke: the GPU check's code paths at tiny sizes on CPU, so it cannot rot between GPU loans.

The smoke run exercises every check (Triton kernels in the interpreter, FlexAttention eager, bf16 vs
fp32, FP8 emulated, fused AdamW, fsdp/ddp on gloo, the sync recorder and step-time breakdown, the
async checkpoint, the MoE layer's grouped vs loop matmuls and its throughput against a dense SwiGLU, and
the throughput subprocesses of bench/throughput.py) and must pass them all.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

ROWS = ("triton rmsnorm float32", "triton rmsnorm bfloat16", "triton rotary float32", "triton rotary bfloat16",
        "triton swiglu float32", "triton swiglu bfloat16", "triton linear+CE float32", "triton linear+CE bfloat16",
        "flex attention bf16", "fused AdamW vs foreach", "bf16 autocast vs fp32", "fsdp world size 1 (gloo)",
        "ddp world size 1 (gloo)", "fp8 training", "no host sync on non-log steps", "step-time breakdown",
        "async checkpoint debug", "moe grouped vs loop", "moe layer: dense SwiGLU", "moe layer: grouped",
        "moe layer: loop", "smoke@64 plain PyTorch", "smoke@64 bigtrain eager", "smoke@64 bigtrain compile+triton")


def test_smoke_runs_every_check_and_writes_the_table(tmp_path: Path, demo_data: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tables = list(tmp_path.glob("gpu-check-smoke-*.md"))
    logs = list(tmp_path.glob("gpu-check-smoke-*.log"))
    assert len(tables) == 1 and len(logs) == 1, sorted(p.name for p in tmp_path.iterdir())
    table = tables[0].read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for row in ROWS:
        found = [line for name, line in lines.items() if name.startswith(row)]
        assert found, f"no row {row!r} in\n{table}"
        status = found[0].split(" | ")[1]
        if row.startswith("smoke@64 bigtrain compile"):
            assert status == "skip", found[0]  # inductor's CPU codegen: minutes
        else:
            assert status in ("pass", "info"), found[0]
    assert "| FAIL |" not in table and "0 failed" in table
    # The kernels ran in Triton's interpreter, with a measured (nonzero, finite) error.
    assert "max rel err" in lines["triton rmsnorm float32"] and "inf" not in lines["triton rmsnorm float32"]
    # The MoE rows: a measured difference, and each layer's tokens/s with its ratio to the dense SwiGLU.
    moe = [line for name, line in lines.items() if name.startswith("moe ")]
    assert "max rel diff" in moe[0] and all("tok/s" in line for line in moe[1:]) and "x dense" in moe[2], moe
    assert not (REPO / "docs" / "performance.md").read_text().count("SMOKE")  # a smoke run never touches docs
