"""Expert parallelism on gloo: a MoE model trained with its experts split over 2 ranks (ep2), and over 2 of 4
ranks with FSDP2 over the other 2 (fsdp2 x ep2), with tensor parallelism for attention (tp2,
fsdp2 x tp2 x ep2) and with context parallelism (cp2 x ep2, its blocks compiled), matches the one-process run
step by step (fp64, 4 steps: losses, grad norms and final weights within the tolerance policy's FP64_REL,
tests/tolerance.py); a run resumes across an EP change (ep2 -> ep1) within FP64_REL of the straight run and
bitwise on the same layout; bad EP configs exit 2. Routing is discrete: the reference run measures its
smallest top-k margin, which must stay far above fp64 rounding so that no layout can flip a choice.

Every layout starts from the same weights (the sharded initializer draws each rank's experts from the
full tensors), reads the same micro-batches (2 sequences each, so the auxiliary balancing loss of every
micro-batch is the same too) and averages gradients over all data-parallel ranks, the experts' included.
The constant learning rate lets a 2-step run end where the first half of the 4-step run does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, overriding, run_distributed, train, train_records
from tests.tolerance import FP64, FP64_REL, assert_runs_close, assert_weights_close

STEPS = 4
HALF = 2
# 6 experts: ep2 holds 3 per rank, which FSDP2 over 2 more ranks shards by hidden unit (dim 1) instead.
MOE = ["model.moe.num_experts=6", "model.moe.top_k=2", "model.moe.expert_hidden_dim=64"]
COMMON = ["train.optimizer=adamw", "model.num_layers=2", "model.dim=64", "model.num_heads=4", "model.num_kv_heads=2",
          *MOE,
          "data.seq_len=64", f"train.max_steps={STEPS}", "train.global_batch_tokens=512", "train.micro_batch_size=2",
          "train.lr_warmup_steps=2", "train.lr_schedule=constant", FP64, "log.every_steps=1",
          "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "checkpoint.at_end=true",
          "run.device=cpu", "run.num_threads=1",
          # Tied, whatever the demo config says (the model these layouts were built on; in fp32 the untied one
          # flipped a top-k choice from step 6; in fp64 test_router_margins_are_far_from_ties guards that).
          "model.tie_embeddings=true"]
FSDP = "parallel.strategy=fsdp"
EP2 = [FSDP, "parallel.expert_parallel=2"]
TP2 = [FSDP, "parallel.tensor_parallel=2"]
TIMEOUT = 300
# The smallest gap between the k-th and (k+1)-th routing score (bias included) in the reference run must be
# far above what layouts change a score by in fp64 (~1e-15; scores are O(0.1)) for no layout to flip a choice.
# Measured: 5.9e-8, which fp32 rounding (~1e-8 on these scores) can flip, and fp64 cannot.
MIN_ROUTER_MARGIN = 1e-11


# Runs whose held memory is compared with `bigtrain plan` (the other MoE layouts: test_plan_vs_measured.py).
MEASURED = {"tp2", "fsdp2xtp2-ep2"}


def train_runs(rank: int, root: str, runs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Train each (name, overrides) in turn in every rank; rank 0 returns each run's train records, and every
    rank the bytes it holds after a backward (``held/<name>``) for the runs in MEASURED."""
    from tests.parallel.measure_memory import held_after_backward

    out: dict[str, Any] = {}
    for name, overrides in runs:
        def measure(trainer: Any, name: str = name) -> None:
            out[f"held/{name}"] = held_after_backward(trainer)["total"]

        margins: list[float] = []

        def hook_routers(trainer: Any, margins: list[float] = margins) -> None:
            record_router_margins(trainer.model, margins)

        train(Path(root) / name, *overriding(COMMON, *overrides), after_fit=measure if name in MEASURED else None,
              before_fit=hook_routers if name == "single" else None)
        if margins:
            out[f"margin/{name}"] = min(margins)
        out[name] = train_records(Path(root) / name) if rank == 0 else None
    return out


def record_router_margins(model: Any, margins: list[float]) -> None:
    """Hook every router of ``model``: append, per forward, the smallest gap between the k-th and (k+1)-th
    selection score of any token (what top-k compares: scores plus the balancing bias)."""
    from bigtrain.model.moe import Router

    def hook(router: Router, args: Any, output: Any) -> None:
        _, scores, _, _ = output
        select = scores if router.expert_bias is None else scores + router.expert_bias
        top = select.detach().topk(router.moe.top_k + 1, dim=-1).values
        margins.append(float((top[:, -2] - top[:, -1]).min()))

    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers, "no MoE router to hook"
    for router in routers:
        router.register_forward_hook(hook)


# Layouts of 4 ranks whose expert-parallel sub-meshes are checked (Layout fields).
MESHES: dict[str, dict[str, int]] = {
    "dp_shard2xcp2-ep2": {"dp_shard": 2, "cp": 2, "ep": 2},
    "dp_shard2xcp2-ep4": {"dp_shard": 2, "cp": 2, "ep": 4},
    "hsdp2xcp2-ep2": {"dp_replicate": 2, "cp": 2, "ep": 2},
    "dp_shard2xtp2-ep2": {"dp_shard": 2, "tp": 2, "ep": 2},
}


def train_runs_and_meshes(rank: int, root: str, runs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """:func:`train_runs`, then this rank's ep and expert-FSDP groups for every layout of MESHES."""
    from bigtrain.parallel.mesh import Layout, ParallelMesh

    out = train_runs(rank, root, runs)
    for name, dims in MESHES.items():
        mesh = ParallelMesh(Layout(**dims), "cpu")
        out[name] = (mesh.ep.mesh.tolist(), mesh.expert_fsdp.mesh.tolist(), mesh.fsdp.mesh.tolist())
    return out


def checkpoint(root: Path, name: str, step: int) -> Path:
    return root / name / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, dict[str, Any]]:
    import torch.distributed as dist

    root = tmp_path_factory.mktemp("ep")
    results = train_runs(0, str(root), [("single", ["parallel.strategy=single"])])
    # ep2: 4 steps, a checkpoint after 2; ep2-resumed: the same layout from that checkpoint.
    # tp2: each tensor-parallel rank routes its sequence shard through whole experts; cp2-ep2-compiled: each
    # context-parallel rank routes its sequence shard, the experts split between the two.
    per_rank = run_distributed(train_runs, 2, str(root), [
        ("ep2", [*EP2, f"checkpoint.every_steps={HALF}"]),
        ("ep2-resumed", [*EP2, f"checkpoint.resume={checkpoint(root, 'ep2', HALF)}"]),
        ("tp2", TP2),
        # Compiled blocks too (aot_eager: dynamo traces the all-to-all dispatch and the expert DTensors).
        ("cp2-ep2-compiled", [*EP2, "parallel.context_parallel=2", "train.compile=true",
                              "train.compile_backend=aot_eager"]),
    ], timeout_s=TIMEOUT)
    results.update(per_rank[0])
    results["held/tp2"] = [r["held/tp2"] for r in per_rank]
    # fsdp2 x ep2: each expert's weights FSDP-sharded over 2 ranks; hsdp2 x ep2: replicated over 2 instead, and
    # every block recomputed in backward (its all-to-alls too).
    per_rank = run_distributed(train_runs_and_meshes, 4, str(root), [
        ("fsdp2xep2", EP2),
        ("hsdp2xep2-actckpt", [*EP2, "parallel.fsdp.replicate_degree=2", "parallel.activation_checkpointing=full"]),
        # ep over the tensor-parallel peers, each expert's weights FSDP-sharded over the 2 data-parallel ranks.
        ("fsdp2xtp2-ep2", [*EP2, "parallel.tensor_parallel=2"]),
    ], timeout_s=TIMEOUT)
    results.update(per_rank[0])
    results["held/fsdp2xtp2-ep2"] = [r["held/fsdp2xtp2-ep2"] for r in per_rank]
    results["meshes"] = [{name: r[name] for name in MESHES} for r in per_rank]
    # ep2 -> ep1: the ep2 run's step-4 checkpoint resumed in one process.
    results.update(train_runs(0, str(root), [
        ("ep1-resumed", ["parallel.strategy=single", f"checkpoint.resume={checkpoint(root, 'ep2', HALF)}"])]))
    assert not dist.is_initialized()
    return root, results


def _final_weights(root: Path, name: str) -> dict[str, Any]:
    from bigtrain.checkpoint.dcp import read_full

    return read_full(checkpoint(root, name, STEPS) / "dcp")


@pytest.mark.parametrize("name", ["ep2", "fsdp2xep2", "hsdp2xep2-actckpt", "tp2", "cp2-ep2-compiled",
                                  "fsdp2xtp2-ep2"])
def test_expert_parallel_matches_single(ep_runs: tuple[Path, dict[str, Any]], name: str) -> None:
    root, runs = ep_runs
    want = runs["single"]
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert want[-1]["loss"] < want[0]["loss"]  # it learns
    assert_runs_close(runs[name], want, FP64_REL, name)
    got_w, want_w = _final_weights(root, name), _final_weights(root, "single")
    assert any(".experts.w1" in k for k in want_w)
    assert_weights_close(got_w, want_w, FP64_REL, name)


def test_router_margins_are_far_from_ties(ep_runs: tuple[Path, dict[str, Any]]) -> None:
    """Routing is discrete: the parity above is only meaningful when no token's top-k choice sits near a tie.
    The reference run's smallest margin over every router, token and step is far above fp64 rounding."""
    margin = ep_runs[1]["margin/single"]
    assert margin > MIN_ROUTER_MARGIN, f"smallest router margin {margin:.3e}: pick another seed or model"


@pytest.mark.parametrize(("name", "ranks", "overrides"), [("tp2", 2, TP2),
                                                         ("fsdp2xtp2-ep2", 4, [*EP2, "parallel.tensor_parallel=2"])])
def test_plan_matches_what_tensor_parallel_moe_layouts_hold(ep_runs: tuple[Path, dict[str, Any]], name: str,
                                                            ranks: int, overrides: list[str]) -> None:
    """`bigtrain plan`'s params + grads + optimizer bytes are within 10% of the most any rank holds after backward
    (MoE layers whole on each tensor-parallel rank, FSDP-sharded over the tensor-parallel ranks too)."""
    from bigtrain.config import load_config
    from bigtrain.parallel.mesh import Layout
    from bigtrain.plan_layout import Hardware, plan_layout

    cfg = load_config("configs/debug.yaml", overriding(COMMON, *overrides))
    plan = plan_layout(cfg, Layout.from_config(cfg.parallel, ranks), Hardware(), device="cpu")
    measured = max(ep_runs[1][f"held/{name}"])
    assert abs(plan.state - measured) <= 0.10 * measured, f"{name}: planned {plan.state:,} B, measured {measured:,} B"


def test_resume_across_an_expert_parallel_change(ep_runs: tuple[Path, dict[str, Any]]) -> None:
    _, runs = ep_runs
    second_half = runs["single"][HALF:]
    assert_runs_close(runs["ep1-resumed"], second_half, FP64_REL, "ep2 -> ep1")
    # The same layout resumes bitwise.
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in runs["ep2-resumed"]] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in runs["ep2"][HALF:]]


# (world size, overrides, parts of the message); the model is the debug one, made MoE by MOE where listed.
def test_expert_parallel_groups_come_from_the_mesh(ep_runs: tuple[Path, dict[str, Any]]) -> None:
    """ep is the innermost part of dp_shard x cp x tp (tensor-, then context-parallel peers first); the expert
    weights are FSDP-sharded over the rest (with dp_replicate in front for HSDP); the dense weights' mesh is
    unchanged."""
    meshes = ep_runs[1]["meshes"]
    # name -> per rank: (ep group, expert-FSDP mesh, dense FSDP mesh)
    want = {
        # Context- and tensor-parallel peers route different sequence shards: ep takes them first.
        "dp_shard2xcp2-ep2": [([0, 1], [0, 2], [0, 1, 2, 3]), ([0, 1], [1, 3], [0, 1, 2, 3]),
                              ([2, 3], [0, 2], [0, 1, 2, 3]), ([2, 3], [1, 3], [0, 1, 2, 3])],
        "dp_shard2xcp2-ep4": [([0, 1, 2, 3], [r], [0, 1, 2, 3]) for r in range(4)],
        "hsdp2xcp2-ep2": [([0, 1], [[0], [2]], [[0, 1], [2, 3]]),
                          ([0, 1], [[1], [3]], [[0, 1], [2, 3]]),
                          ([2, 3], [[0], [2]], [[0, 1], [2, 3]]),
                          ([2, 3], [[1], [3]], [[0, 1], [2, 3]])],
        "dp_shard2xtp2-ep2": [([0, 1], [0, 2], [0, 2]), ([0, 1], [1, 3], [1, 3]),
                              ([2, 3], [0, 2], [0, 2]), ([2, 3], [1, 3], [1, 3])],
    }
    for name, per_rank in want.items():
        got = [tuple(meshes[rank][name]) for rank in range(4)]
        assert got == per_rank, name


@pytest.mark.parametrize(("world", "overrides", "expected"), [
    (4, [*overriding(MOE, "model.moe.num_experts=6"), FSDP, "parallel.expert_parallel=4"],
     ["parallel.expert_parallel=4 must divide model.moe.num_experts=6", "values that fit this model: 1, 2, 3, 6"]),
    (6, [*overriding(MOE, "model.moe.num_experts=8"), FSDP, "parallel.expert_parallel=4"],
     ["parallel.expert_parallel=4 must divide the data-, context- and tensor-parallel ranks",
      "dp_shard 6 = 6", "values that fit this launch: 1, 2, 3, 6"]),
    (4, [*overriding(MOE, "model.moe.num_experts=8"), FSDP, "parallel.expert_parallel=4",
         "parallel.fsdp.replicate_degree=2"],
     ["parallel.expert_parallel=4 must divide", "dp_shard 2 = 2", "values that fit this launch: 1, 2"]),
    (2, [FSDP, "parallel.expert_parallel=2"],
     ["parallel.expert_parallel=2 needs a Mixture-of-Experts model", "set parallel.expert_parallel=1"]),
    (2, [*MOE, "parallel.strategy=ddp", "parallel.expert_parallel=2"],
     ["parallel.expert_parallel=2 needs parallel.strategy=fsdp", "ddp keeps every expert on every rank"]),
    (2, [*MOE, "parallel.strategy=zero", "parallel.expert_parallel=2"], ["needs parallel.strategy=fsdp"]),
])
def test_bad_expert_parallel_configs_exit_2(world: int, overrides: list[str], expected: list[str]) -> None:
    proc = cli("config", "check", "--world-size", str(world), "configs/debug.yaml", "train.micro_batch_size=1",
               *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for part in expected:
        assert part in proc.stderr, proc.stderr
