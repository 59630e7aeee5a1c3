"""`bigtrain plan` end to end: the table for a shipped config, and bad input exits 2 with a message."""
from __future__ import annotations

import pytest

from tests.helpers import cli


def test_plan_llama3_8b_on_64_ranks() -> None:
    proc = cli("plan", "configs/llama3-8b.yaml", "--world-size", "64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "8.03B params" in out and "GFLOP/token" in out and "4,194,304 tokens/step" in out and "grad accum 8" in out
    assert "bf16 compute on cuda" in out
    for label in ("single (1 rank)", "ddp", "zero-1", "zero-2", "zero-3", "fsdp"):
        assert label in out, out
    assert "total GiB" in out and "verdict:" in out and "estimate" in out


def test_plan_one_strategy_with_overrides() -> None:
    proc = cli("plan", "configs/llama3-8b.yaml", "parallel.activation_checkpointing=full", "--world-size", "8",
                   "--strategy", "fsdp", "--gpu-memory-gib", "141", "--device", "cuda")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "activation_checkpointing=full" in proc.stdout and "141 GiB" in proc.stdout
    assert "zero-1" not in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--world-size", "3"], "cannot be split over 3 ranks"),
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--world-size", "8", "--strategy", "zero4"], "invalid choice"),
    (["--world-size", "8", "--strategy", "single"], "single runs one process"),
    (["--world-size", "8", "model.num_layrs=2"], "did you mean"),
])
def test_plan_bad_input_exits_2(args: list[str], needle: str) -> None:
    config_args = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    proc = cli("plan", "configs/llama3-8b.yaml", *config_args, *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle.lower() in proc.stderr.lower(), proc.stderr
