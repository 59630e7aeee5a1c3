"""Backend parity on 2 gloo ranks: single vs DDP vs FSDP2/HSDP (fp64) vs DeepSpeed ZeRO-1/2/3 (fp32, which
DeepSpeed needs) give the same losses and grad norms within the tolerance policy (tests/tolerance.py), and
stay within the documented bound in bf16. A planted bug (one rank's gradient shard 1% off) fails every
tolerance of the policy by orders of magnitude.

Every backend starts from bit-identical weights (sharding-independent init), sees the same global
batch (the data order does not depend on the world size) and averages gradients the same way,
so per-step losses and gradient norms agree to float rounding. One launch of 2 in-process ranks
(tests/helpers.py ``run_distributed``) trains every 2-rank layout in turn; the one-process runs
(the reference, DDP on one rank) train in the pytest process. The launch has a timeout: a
collective mismatch fails, never hangs. (The CLI under torchrun, once per backend, is
tests/e2e/test_backends_cli.py.)
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import build_trainer, overriding, run_distributed, train, train_records
from tests.tolerance import FP32_REL, FP64, FP64_REL, assert_runs_close, max_rel_diff

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS = 5
# A small model; micro_batch_size=2 gives 2 accumulation micro-steps on 2 ranks (4 on one), so no_sync is exercised.
COMMON = ["train.optimizer=adamw", "model.num_layers=2", "model.dim=64", "model.num_heads=4", "data.seq_len=128",
          f"train.max_steps={STEPS}", "train.global_batch_tokens=1024", "train.micro_batch_size=2",
          "train.lr_warmup_steps=2", FP64, "log.every_steps=1", "eval.every_steps=0",
          "eval.at_end=false", "checkpoint.at_end=false", "log.sample_at_end=false", "run.device=cpu",
          "run.num_threads=1"]
TIMEOUT = 600
FP32 = "train.precision=fp32"  # DeepSpeed ZeRO keeps fp32 master weights: its layouts compare with single@fp32

# name -> (ranks, overrides); every one is compared with the single-process run.
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "ddp2": (2, ["parallel.strategy=ddp"]),
    "ddp1": (1, ["parallel.strategy=ddp"]),
    "fsdp2": (2, ["parallel.strategy=fsdp"]),
    # HSDP (2 replicas x 1 shard) with full activation checkpointing and no resharding after forward.
    "hsdp2x1-actckpt": (2, ["parallel.strategy=fsdp", "parallel.fsdp.replicate_degree=2",
                            "parallel.activation_checkpointing=full", "parallel.fsdp.reshard_after_forward=false"]),
    "zero1": (2, ["parallel.strategy=zero", "parallel.zero.stage=1", FP32]),
    "zero2": (2, ["parallel.strategy=zero", "parallel.zero.stage=2", FP32]),
    # Stage 3 also runs with full activation checkpointing (applied before DeepSpeed partitions the
    # model): recomputing a block re-gathers its parameters and must give the same numbers.
    "zero3-actckpt": (2, ["parallel.strategy=zero", "parallel.zero.stage=3", "parallel.activation_checkpointing=full",
                          FP32]),
}
# The planted bug: FSDP2 on 2 ranks with rank 1's gradient shards 1% too large before clipping and the step
# (a mis-scaled reduction of one shard, as a wrong divisor for an uneven shard would give).
PLANTED = "fsdp2-planted-bug"
PLANTED_SCALE = 1.01


def _reference(name: str) -> str:
    """The single-process run a layout is compared with: fp32 for ZeRO, fp64 for the rest."""
    return "single@fp32" if name.startswith("zero") else "single"


def _tolerance(name: str) -> float:
    return FP32_REL if name.startswith("zero") else FP64_REL


def _plant_bug() -> Any:
    """Patch this rank's gradient clipping so rank 1 scales its gradient shards by PLANTED_SCALE first;
    returns the undo."""
    import torch
    import torch.distributed as dist

    from bigtrain.parallel import fsdp

    original = fsdp.FSDPStrategy.clip_grad_norm

    def clip_grad_norm(self: Any, model: Any, max_norm: float) -> Any:
        if dist.get_rank() == 1:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(PLANTED_SCALE)
        return original(self, model, max_norm)

    fsdp.FSDPStrategy.clip_grad_norm = clip_grad_norm  # type: ignore[method-assign]

    def undo() -> None:
        fsdp.FSDPStrategy.clip_grad_norm = original  # type: ignore[method-assign]

    return undo


def train_each(rank: int, root: str, runs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """In every rank: train each (name, overrides) in turn; per run, rank 0's train records and messages.
    (An exception stops the launch: run_distributed reports it with the rank's traceback.)

    On 2 ranks it first asks for parallel.strategy=single, a user error there (its message is returned)."""
    from bigtrain.errors import UserError

    results: dict[str, Any] = {}
    if int(os.environ.get("WORLD_SIZE", "1")) == 2:
        with pytest.raises(UserError) as info:
            build_trainer("configs/debug.yaml",
                          [f"run.out_dir={root}/bad", *overriding(COMMON, "parallel.strategy=single")])
        results["single-on-2-ranks"] = str(info.value)
    for name, overrides in runs:
        t0 = time.perf_counter()
        undo = _plant_bug() if name == PLANTED else None
        try:
            _, lines = train(Path(root) / name, *overriding(COMMON, *overrides))
        finally:
            if undo is not None:
                undo()
        results[name] = {"records": train_records(Path(root) / name) if rank == 0 else None, "messages": lines,
                         "seconds": time.perf_counter() - t0}
    return results


def run_layouts(root: Path, jobs: list[tuple[str, int, list[str]]]) -> dict[str, dict]:
    """Train each (result name, ranks, overrides); rank 0's results. One-process jobs run in this process
    (a one-rank process group, if the layout makes one, is destroyed after); 2-rank jobs in one launch."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    try:
        out = train_each(0, str(root), [(name, overrides) for name, ranks, overrides in jobs if ranks == 1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    two = [(name, overrides) for name, ranks, overrides in jobs if ranks == 2]
    if two:
        out.update(run_distributed(train_each, 2, str(root), two, timeout_s=TIMEOUT)[0])
    return out


def records_of(results: dict[str, dict], name: str) -> list[dict]:
    return results[name]["records"]


BF16 = "train.precision=bf16"
BF16_LAYOUTS = ["ddp2", "fsdp2", "zero2"]  # compared with single in bf16 (test_bf16_backends_agree_...)


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, dict]:
    """Every layout, the planted bug and the bf16 runs, in one 2-rank launch (each launch costs its start-up)."""
    names = [n for n in LAYOUTS if not n.startswith("zero") or HAS_DEEPSPEED]
    jobs = [("single", 1, ["parallel.strategy=single"]), ("single@fp32", 1, ["parallel.strategy=single", FP32])]
    jobs += [(n, *LAYOUTS[n]) for n in names] + [(PLANTED, 2, ["parallel.strategy=fsdp"])]
    if HAS_DEEPSPEED:
        jobs += [("single@bf16", 1, ["parallel.strategy=single", BF16])]
        jobs += [(f"{n}@bf16", LAYOUTS[n][0], [*LAYOUTS[n][1], BF16]) for n in BF16_LAYOUTS]
    results = run_layouts(tmp_path_factory.mktemp("parity"), jobs)
    single = records_of(results, "single")
    assert len(single) == STEPS and single[-1]["loss"] < single[0]["loss"]
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backend_matches_single(parity_runs: dict[str, dict], name: str) -> None:
    if name.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    want = records_of(parity_runs, _reference(name))
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert_runs_close(records_of(parity_runs, name), want, _tolerance(name), name)
    header = parity_runs[name]["messages"]
    assert any(f"cpu x {LAYOUTS[name][0]}, strategy {LAYOUTS[name][1][0].split('=')[1]}" in m for m in header), header
    if name.startswith("zero"):  # DeepSpeed ran the stage asked for, with the config bigtrain generated
        stage = LAYOUTS[name][1][1].split("=")[1]
        assert any(m.startswith("deepspeed config:") and f'"stage":{stage}' in m for m in header), header


def test_planted_bug_fails_every_tolerance(parity_runs: dict[str, dict]) -> None:
    """The policy's proof: a 1% mis-scaled gradient shard on one rank moves the run by more than 1,000x FP64_REL
    and 10x FP32_REL, while the correct FSDP2 run stays inside FP64_REL."""
    want = records_of(parity_runs, "single")
    planted = max_rel_diff(records_of(parity_runs, PLANTED), want)
    assert planted > 1e3 * FP64_REL and planted > 10 * FP32_REL, planted
    assert max_rel_diff(records_of(parity_runs, "fsdp2"), want) <= FP64_REL


def test_strategy_single_on_two_ranks_is_a_user_error(parity_runs: dict[str, dict]) -> None:
    """(Exit status 2 and no traceback under torchrun: tests/e2e/test_backends_cli.py.)"""
    message = parity_runs["single-on-2-ranks"]
    assert "parallel.strategy=single" in message and "2 processes" in message, message


# bf16 compute rounds differently per backend: FSDP2 keeps bf16 sharded params and reduces in fp32,
# DeepSpeed casts the module to bf16 and steps an fp32 master, DDP/single autocast over fp32 weights.
# Over 5 steps the losses stay within 1% and grad norms within 5% of the single-process bf16 run
# (documented in docs/parallelism.md); fp32 runs agree to 1e-5 above.
BF16_LOSS_REL, BF16_GRAD_NORM_REL = 1e-2, 5e-2


def test_bf16_backends_agree_within_documented_bound(parity_runs: dict[str, dict]) -> None:
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    want = records_of(parity_runs, "single@bf16")
    for name in BF16_LAYOUTS:
        got = records_of(parity_runs, f"{name}@bf16")
        assert any("compute bfloat16" in m for m in parity_runs[f"{name}@bf16"]["messages"]), f"{name}: not bf16"
        assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1)), name
        for g, w in zip(got, want, strict=True):
            assert g["loss"] == pytest.approx(w["loss"], rel=BF16_LOSS_REL), (name, g["step"], g["loss"], w["loss"])
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=BF16_GRAD_NORM_REL), (name, g["step"])
