"""`bigtrain plan` for N-D layouts (bigtrain/plan_layout.py): memory splits as the code splits the model,
the step-time estimate moves the way its model says, and the 405B config gets a layout that fits 80 GB; for
Mixture-of-Experts models, the expert-parallel degrees, their all-to-all term and the presets' own layouts.
(Plan vs what tiny models really hold in each layout: tests/parallel/test_nd_parity.py.)"""
from __future__ import annotations

import itertools

import pytest

from bigtrain.config import load_config
from bigtrain.model import count_parameters
from bigtrain.parallel.mesh import Layout
from bigtrain.plan import GIB
from bigtrain.plan_layout import (
    Hardware,
    candidate_layouts,
    format_layouts,
    plan_layout,
    rank_layouts,
    traffic_bytes,
)
from bigtrain.sections import ConfigError
from tests.helpers import cli

HW = Hardware()


def test_state_divides_by_every_model_dimension() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.strategy=fsdp"])
    one = plan_layout(cfg, Layout(dp_shard=8), HW)
    assert one.state == pytest.approx(16 * count_parameters(cfg.model) / 8, rel=0.01)  # fp32 p + g + 2 moments
    tp = plan_layout(cfg, Layout(dp_shard=4, tp=2), HW)
    cp = plan_layout(cfg, Layout(dp_shard=4, cp=2), HW)
    # Tensor parallelism shards what FSDP shards (norms aside): the same state on 8 ranks either way.
    assert tp.state == pytest.approx(one.state, rel=0.01) and cp.state == pytest.approx(one.state, rel=0.01)
    # ... but it splits activations: TP (sequence-parallel parts), CP (the sequence) roughly halve them.
    assert tp.activations < 0.7 * one.activations and cp.activations == pytest.approx(one.activations / 2, rel=0.01)
    assert tp.tp_s > 0 and cp.cp_s > 0 and one.tp_s == one.cp_s == 0


def test_pipeline_stages_split_the_blocks_and_cost_a_bubble() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.strategy=fsdp", "model.tie_embeddings=false",
                                                 "train.micro_batch_size=1"])
    flat = plan_layout(cfg, Layout(dp_shard=8), HW)
    pp = plan_layout(cfg, Layout(pp=2, dp_shard=4), HW)
    # Half the blocks on twice fewer FSDP ranks: about the same state, plus the output projection whole-ish.
    assert pp.state == pytest.approx(flat.state, rel=0.15)
    assert pp.bubble == pytest.approx(1 / pp.microbatches) and flat.bubble == 0
    assert pp.pp_s > 0 and pp.step_s > pp.compute_s


def test_llama3_405b_on_1024_gpus_fits_80_gb() -> None:
    cfg = load_config("configs/llama3-405b.yaml")
    own = plan_layout(cfg, Layout.from_config(cfg.parallel, 1024), HW)
    assert own.layout == Layout(pp=2, dp_shard=64, tp=8)
    assert own.peak < 80 * GIB, own.peak / GIB
    ranked = rank_layouts(cfg, 1024, HW)
    assert ranked and ranked[0].peak < 80 * GIB
    assert all(a.step_s <= b.step_s for a, b in itertools.pairwise(ranked) if b.peak < 80 * GIB)
    assert all(lay.tp <= 8 and cfg.model.num_layers % lay.pp == 0 for lay in candidate_layouts(cfg, 1024, HW))
    text = format_layouts(cfg, 1024, HW)
    assert "(config)" in text and "suggested: parallel.strategy=fsdp" in text and "no layout fits" not in text


def test_cli_plan_prints_the_layouts_and_refuses_a_layout_that_cannot_run() -> None:
    proc = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1024")
    assert proc.returncode == 0, proc.stderr
    assert "N-D layouts on 1024 ranks" in proc.stdout and "pp 2 x dp_shard 64 x tp 8 (config)" in proc.stdout
    assert "suggested:" in proc.stdout
    bad = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1000")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "needs a multiple of 16 processes, but there are 1000" in bad.stderr, bad.stderr
    flag = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1024", "--efficiency", "2")
    assert flag.returncode == 2 and "--efficiency must be in (0, 1]" in flag.stderr


# --------------------------------------------------------------------------- Mixture-of-Experts


@pytest.mark.parametrize("config,world,ep", [("configs/olmoe-1b-7b.yaml", 64, 8),
                                              ("configs/qwen3-30b-a3b.yaml", 128, 8)])
def test_moe_presets_plan_their_own_layout_and_enumerate_expert_parallel(config: str, world: int, ep: int) -> None:
    cfg = load_config(config)
    own = plan_layout(cfg, Layout.from_config(cfg.parallel, world), HW)
    assert own.layout == Layout(dp_shard=world, ep=ep)
    assert own.peak < 80 * GIB and own.state == pytest.approx(16 * count_parameters(cfg.model) / world, rel=0.01)
    assert own.ep_s > 0
    layouts = candidate_layouts(cfg, world, HW)
    assert cfg.model.moe is not None
    experts = cfg.model.moe.num_experts
    # MoE models run without pipeline parallelism; every ep dividing dp_shard x cp x tp and the experts.
    assert all(lay.pp == 1 for lay in layouts) and any(lay.tp > 1 and lay.ep > 1 for lay in layouts)
    assert all(experts % lay.ep == 0 and (lay.dp_shard * lay.cp * lay.tp) % lay.ep == 0 for lay in layouts)
    assert {lay.ep for lay in layouts if lay.cp == 1 and lay.tp == 1} == {d for d in range(1, world + 1)
                                                                          if world % d == 0 and experts % d == 0}
    ranked = rank_layouts(cfg, world, HW)
    assert ranked[0].peak < 80 * GIB
    text = format_layouts(cfg, world, HW)
    assert f"dp_shard {world} (ep {ep}) (config)" in text and "a2a s" in text and " ep " in text
    assert "parallel.expert_parallel=" in text.split("suggested:")[1] and "no layout fits" not in text
    assert "no layout fits" in format_layouts(cfg, world, Hardware(gpu_memory_gib=1))


def test_expert_parallel_all_to_all_and_sharding_by_hand() -> None:
    """Per MoE layer and microbatch 4 all-to-alls (6 when checkpointed) of k x dim x tokens x a x (ep-1)/ep bytes,
    over NVLink while ep fits a node; experts / ep gathered per rank; the same state for every ep."""
    cfg = load_config("configs/olmoe-1b-7b.yaml")  # full checkpointing, bf16, micro 2 x 4096, accum 8 on 64
    h, k, layers, tokens, micro = 2048, 8, 16, 2 * 4096, 8
    plans = {ep: plan_layout(cfg, Layout(dp_shard=64, ep=ep), HW) for ep in (1, 8, 16)}
    for ep in (8, 16):
        sent = 6 * layers * micro * tokens * k * h * 2 * (ep - 1) / ep
        assert traffic_bytes(cfg, Layout(dp_shard=64, ep=ep))["ep"] == pytest.approx(sent)
        link = (HW.intra_node_gbps if ep <= HW.gpus_per_node else HW.inter_node_gbps) * 1e9
        assert plans[ep].ep_s == pytest.approx(sent / link)
        assert plans[ep].state == pytest.approx(plans[1].state, rel=1e-3)
        assert plans[ep].buffers < plans[1].buffers  # gathers experts / ep per block
    assert plans[1].ep_s == 0 and traffic_bytes(cfg, Layout(dp_shard=64))["ep"] == 0
    none = plan_layout(load_config("configs/olmoe-1b-7b.yaml", ["parallel.activation_checkpointing=none"]),
                       Layout(dp_shard=64, ep=8), HW)
    assert none.ep_s == pytest.approx(plans[8].ep_s * 4 / 6)  # no recompute: 4 all-to-alls per layer
    assert none.activations > 3 * plans[8].activations


def test_moe_layers_under_tensor_parallelism_by_hand() -> None:
    """MoE layers stay whole on each tensor-parallel rank and are FSDP-sharded over dp_shard x tp, so dp_shard 32 x
    tp 2 holds what dp_shard 64 holds; tensor parallelism gathers and scatters around attention only (2 collectives
    per pass), and each tensor-parallel rank sends its sequence shard's routed copies to the experts."""
    cfg = load_config("configs/olmoe-1b-7b.yaml")  # 16 MoE layers, full checkpointing, bf16, micro 2 x 4096
    flat, tp2 = Layout(dp_shard=64, ep=8), Layout(dp_shard=32, tp=2, ep=8)
    assert plan_layout(cfg, tp2, HW).state == pytest.approx(plan_layout(cfg, flat, HW).state, rel=1e-3)
    h, layers, tokens, micro = 2048, 16, 2 * 4096, 16  # 32 data-parallel ranks: accumulation 16
    traffic = traffic_bytes(cfg, tp2)
    assert traffic["tp"] == pytest.approx(2 * 3 * layers * micro * tokens * h * 2 * (2 - 1) / 2)
    assert traffic["ep"] == pytest.approx(traffic_bytes(cfg, flat)["ep"])  # twice the microbatches, half the tokens
    ep1 = plan_layout(cfg, Layout(dp_shard=32, tp=2), HW)
    assert ep1.activations < plan_layout(cfg, Layout(dp_shard=64), HW).activations  # half the tokens per MoE layer


def test_invalid_expert_parallel_layouts_are_refused() -> None:
    moe = load_config("configs/olmoe-1b-7b.yaml")
    with pytest.raises(ConfigError, match=r"must divide model\.moe\.num_experts=64"):
        plan_layout(moe, Layout(dp_shard=48, ep=3), HW)
    with pytest.raises(ConfigError, match="pipeline_parallel=2 is not supported for MoE"):
        plan_layout(moe, Layout(dp_shard=32, pp=2), HW)
    with pytest.raises(ConfigError, match="needs a Mixture-of-Experts model"):
        plan_layout(load_config("configs/llama3-8b.yaml"), Layout(dp_shard=8, ep=2), HW)
    bad = cli("plan", "configs/olmoe-1b-7b.yaml", "--world-size", "4")
    assert bad.returncode == 2 and "parallel.expert_parallel=8 must divide" in bad.stderr, bad.stderr


@pytest.mark.parametrize("extra,layout", [
    (["model.moe.num_experts=6", "parallel.expert_parallel=2"], Layout(dp_shard=4, ep=2)),  # 3 local: by hidden unit
    (["parallel.expert_parallel=2", "parallel.fsdp.replicate_degree=2"], Layout(dp_replicate=2, dp_shard=2, ep=2)),
    (["model.moe.num_shared_experts=1", "model.moe.first_dense_layers=1", "parallel.expert_parallel=4"],
     Layout(dp_shard=4, ep=4)),
])
def test_expert_parallel_state_agrees_with_the_data_parallel_plan(extra: list[str], layout: Layout) -> None:
    """The N-D plan and plan_memory's fsdp row (held to measured bytes in tests/parallel/test_plan_vs_measured.py;
    these three layouts matched to the byte on 4 gloo ranks when written) count the same expert shards."""
    from bigtrain.plan import plan_memory

    # AdamW: the flat plan also counts Muon's transient whole-matrix gather, which the N-D plan leaves out.
    cfg = load_config("configs/debug.yaml", ["model.preset=moe-debug", "parallel.strategy=fsdp", "data.seq_len=128",
                                             "train.global_batch_tokens=1024", "train.micro_batch_size=2",
                                             "train.optimizer=adamw", *extra])
    flat = plan_memory(cfg, 4, "fsdp", device="cpu")
    nd = plan_layout(cfg, layout, HW, device="cpu")
    assert (nd.params, nd.grads, nd.optimizer, nd.buffers) == (flat.params, flat.grads, flat.optimizer, flat.buffers)


def test_zero_bubble_schedule_plans_a_third_of_the_bubble_and_keeps_the_stage_gathered() -> None:
    plans = {}
    for schedule in ("interleaved_1f1b", "interleaved_zb"):
        cfg = load_config("configs/llama3-405b.yaml", [f"parallel.pipeline_schedule={schedule}",
                                                       "parallel.pipeline_virtual_stages=3"])  # 126 layers
        plans[schedule] = plan_layout(cfg, Layout.from_config(cfg.parallel, 1024), HW)
    one_f_one_b, zero_bubble = plans["interleaved_1f1b"], plans["interleaved_zb"]
    assert one_f_one_b.bubble > 0 and zero_bubble.bubble == pytest.approx(one_f_one_b.bubble / 3)
    assert zero_bubble.state == one_f_one_b.state and zero_bubble.buffers > one_f_one_b.buffers
