"""The run header's words for the parallelism backend come from the strategy (``Strategy.describe``), not from
branches in the trainer: the device line's ``strategy ...`` text (with FSDP2's N-D layout) and the kernels
line's compiled-blocks note. The multi-rank headers themselves are checked by the parity tests
(tests/parallel/test_parity.py, test_nd_parity.py) and the torchrun launches (tests/e2e/test_backends_cli.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain import messages
from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.strategy import Description, Strategy
from bigtrain.sections import parse_section
from tests.helpers import REPO, build_trainer


def _strategy(name: str, world: int, compile: bool | str, **parallel: Any) -> Strategy:
    from bigtrain.parallel.ddp import DDPStrategy
    from bigtrain.parallel.fsdp import FSDPStrategy
    from bigtrain.parallel.single import SingleStrategy
    from bigtrain.parallel.zero import ZeroStrategy

    info = DistInfo(rank=0, local_rank=0, world_size=world, device=torch.device("cpu"))
    cfg = parse_section(ParallelConfig, {"strategy": name, **parallel}, "parallel")
    if name == "single":
        return SingleStrategy(info, "fp32", cfg, compile=compile)
    if name == "ddp":
        return DDPStrategy(info, "fp32", cfg, compile=compile)
    if name == "fsdp":
        return FSDPStrategy(info, "fp32", cfg, compile=compile, micro_batch_size=2, accum_steps=2)
    return ZeroStrategy(info, "fp32", cfg, compile=compile, micro_batch_size=2, grad_clip=1.0, accum_steps=1)


COMPILED = "blocks torch.compile'd ({})"
CASES = [
    ("single", 1, False, {}, Description("single", "")),
    ("single", 1, True, {}, Description("single", COMPILED.format("inductor"))),
    ("ddp", 2, "aot_eager", {}, Description("ddp", COMPILED.format("aot_eager"))),
    ("fsdp", 2, False, {}, Description("fsdp", "")),
    ("fsdp", 4, "aot_eager", {"tensor_parallel": 2},
     Description("fsdp (dp_shard 2 x tp 2)", COMPILED.format("aot_eager"))),
    ("fsdp", 2, False, {"pipeline_parallel": 2}, Description("fsdp (pp 2)", "")),
    ("zero", 2, True, {"zero": {"stage": 2}}, Description("zero", COMPILED.format("inductor"))),
    ("zero", 2, True, {"zero": {"stage": 3}}, Description("zero", "")),  # no compile under stage 3
]


@pytest.mark.parametrize(("name", "world", "compile", "parallel", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'-'.join(c[3])}" for c in CASES])
def test_strategy_describes_itself(name: str, world: int, compile: bool | str, parallel: dict[str, Any],
                                   expected: Description) -> None:
    with messages.capture():  # ZeRO-3 says why it does not compile
        strategy = _strategy(name, world, compile, **parallel)
    assert strategy.describe() == expected


def test_header_prints_the_strategys_description(tmp_path: Path, demo_data: Path) -> None:
    """The trainer prints ``describe()`` as it is: the device line and the kernels line of a compiled run."""
    threads = torch.get_num_threads()
    trainer = None
    try:
        with messages.capture():
            trainer = build_trainer(REPO / "configs" / "debug.yaml", [
                f"run.out_dir={tmp_path / 'run'}", "log.console=false", "train.compile=true",
                "train.compile_backend=aot_eager", "run.num_threads=1", "model.kernels=torch"])
        with messages.capture() as printed:
            trainer._print_header()
    finally:
        if trainer is not None:
            trainer.run_lock.release()
            trainer.loader.close()
        torch.set_num_threads(threads)
    header = printed[0].splitlines()
    device = "  device   cpu x 1, strategy single, compute float32, threads 1"
    assert any(line.startswith(device) for line in header), header
    assert any(line.startswith("  kernels  torch (reference ops)")
               and line.endswith("; blocks torch.compile'd (aot_eager)") for line in header), header


def test_a_warmup_longer_than_the_run_is_warned_about() -> None:
    """lr_warmup_steps > max_steps is valid but the peak learning rate is never reached: said, with the fix."""
    from bigtrain.config import load_config

    cfg = load_config("configs/debug.yaml", ["train.lr_warmup_steps=1000", "train.max_steps=500", "train.lr=1e-3"])
    (warning,) = cfg.train.warnings()
    assert "train.lr_warmup_steps=1000 is more than train.max_steps=500" in warning, warning
    assert "never reaches train.lr=0.001 (it ends near 0.0005)" in warning and "lower lr_warmup_steps" in warning
    assert load_config("configs/debug.yaml", ["train.lr_warmup_steps=10"]).train.warnings() == []
