"""bigtrain.plan: per-rank memory per backend, from meta-device shapes (nothing allocated)."""
from __future__ import annotations

import math

import pytest

import bigtrain.plan as plan_mod
from bigtrain.config import ConfigError, load_config
from bigtrain.errors import UserError
from bigtrain.model import count_parameters
from bigtrain.plan import GIB, activation_bytes, format_plan, plan_memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_llama3_70b_fsdp_64_plans_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real_build = plan_mod.build_on_meta

    def spy(mcfg):
        model = real_build(mcfg)
        built.append(all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers()))
        return model

    monkeypatch.setattr(plan_mod, "build_on_meta", spy)
    plan_mod._shapes.cache_clear()
    cfg = load_config("configs/llama3-8b.yaml", ["model.preset=llama3-70b"])
    before = _rss_bytes()
    plan = plan_memory(cfg, 64, "fsdp")
    assert _rss_bytes() - before < 2 * GIB
    assert built == [True]
    n = count_parameters(cfg.model)
    assert 70.5e9 < n < 70.6e9
    assert plan.shard_size == 64 and plan.compute_dtype == "bf16"  # auto on CUDA
    assert plan.params == pytest.approx(4 * n / 64, rel=1e-3)  # fp32 shards (dims divide by 64 here)
    assert plan.grads == plan.params
    assert plan.optimizer == pytest.approx(8 * n / 64, rel=1e-3)


def test_gpt2_124m_numbers_by_hand() -> None:
    cfg = load_config("configs/gpt2-124m.yaml")
    n = 50304 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768
    assert n == count_parameters(cfg.model) == 123_587_328
    tensors = 1 + 12 * 9 + 1  # tied embedding, 9 per block, final norm
    single = plan_memory(cfg, 1, "single", device="cpu")
    assert (single.params, single.grads, single.optimizer) == (4 * n, 4 * n, 8 * n + 4 * tensors)
    assert single.buffers == 0
    ddp = plan_memory(cfg, 8, "ddp", device="cpu")
    assert ddp.state == single.state and ddp.buffers == 0  # replicated; grads are views into DDP's buckets
    assert plan_memory(cfg, 8, "ddp", device="cpu", ddp_bucket_view=False).buffers == 4 * n
    fsdp = plan_memory(cfg, 8, "fsdp", device="cpu")
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (4 * n // 8, 4 * n // 8, 8 * n // 8 + 4 * tensors)
    z2 = plan_memory(cfg, 8, "zero2", device="cuda")  # bf16: DeepSpeed holds bf16 params + fp32 master partition
    part = math.ceil(n / 8)
    assert (z2.params, z2.grads, z2.optimizer) == (2 * n, 2 * part, 4 * part + 8 * part + 8)
    # Activations, fp32, no checkpointing: per token and block 2(8+4)h + 5*4h + 4*4f, then final norm + loss.
    h, f, v = 768, 2048, 50304
    per_token = 12 * (24 * h + 20 * h + 16 * f) + 12 * h + 8 * v
    assert single.activations == per_token * 16 * 1024 == activation_bytes(cfg, 4)
    assert 18 * GIB < single.activations < 19 * GIB
    ckpt = load_config("configs/gpt2-124m.yaml", ["parallel.activation_checkpointing=full"])
    full = plan_memory(ckpt, 1, "single", device="cpu").activations
    assert full == (12 * 4 * h + (24 * h + 20 * h + 16 * f) + 12 * h + 8 * v) * 16 * 1024
    every2 = plan_memory(load_config("configs/gpt2-124m.yaml", ["parallel.activation_checkpointing=every_k"]),
                         1, "single", device="cpu").activations
    assert full < every2 < single.activations


def test_qk_norm_counts_its_weights_and_activations() -> None:
    """model.qk_norm adds 2 x head_dim parameters per block (one more tensor each) and, per token and block,
    (8 + a) bytes for each element of q and k."""
    base = plan_memory(load_config("configs/gpt2-124m.yaml"), 1, "single", device="cpu")
    cfg = load_config("configs/gpt2-124m.yaml", ["model.qk_norm=true"])
    qk = plan_memory(cfg, 1, "single", device="cpu")
    n = 12 * 2 * 64
    assert count_parameters(cfg.model) - 123_587_328 == n
    assert (qk.params - base.params, qk.optimizer - base.optimizer) == (4 * n, 8 * n + 4 * 2 * 12)
    assert qk.activations - base.activations == 12 * (8 + 4) * (768 + 768) * 16 * 1024


@pytest.mark.parametrize("config,world", [("configs/llama3-8b.yaml", 64), ("configs/gpt2-124m.yaml", 8)])
def test_zero_stages_shrink_per_rank(config: str, world: int) -> None:
    cfg = load_config(config)
    plans = {s: plan_memory(cfg, world, s) for s in ("ddp", "zero1", "zero2", "zero3", "fsdp")}
    assert plans["zero3"].state < plans["zero2"].state < plans["zero1"].state < plans["ddp"].state
    assert plans["zero3"].total < plans["zero2"].total < plans["zero1"].total < plans["ddp"].total
    assert plans["fsdp"].state < plans["zero1"].state


def test_zero_fp32_master_shared_and_stage3_persistent_params() -> None:
    cfg = load_config("configs/gpt2-124m.yaml")
    n = count_parameters(cfg.model)
    part = math.ceil(n / 8)
    z1 = plan_memory(cfg, 8, "zero1", device="cpu")
    # fp32: the master partition shares the working partition's storage, so only the moments count.
    assert z1.optimizer == 8 * part + 8 and z1.params == z1.grads == 4 * n
    offloaded = plan_memory(load_config("configs/gpt2-124m.yaml", ["parallel.zero.offload_optimizer=true"]),
                            8, "zero1", device="cpu")
    assert offloaded.host == 4 * part + 8 * part + 8  # an offloaded optimizer keeps its own fp32 master
    z3 = plan_memory(cfg, 8, "zero3", device="cpu")
    assert z3.optimizer == pytest.approx(8 * n / 8, rel=1e-3)
    persistent = 12 * 2 * 768 + 768  # norm gains: below the 1e5-element persistence threshold
    assert z3.params == pytest.approx(4 * (n / 8 + persistent), rel=1e-3)
    no_persist = load_config("configs/gpt2-124m.yaml",
                             ["parallel.zero.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    assert plan_memory(no_persist, 8, "zero3", device="cpu").params < z3.params


def test_hsdp_shards_within_a_replica_group() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.fsdp.replicate_degree=8"])
    hsdp = plan_memory(cfg, 64, "fsdp")
    fsdp = plan_memory(load_config("configs/llama3-8b.yaml"), 64, "fsdp")
    assert hsdp.shard_size == 8
    assert hsdp.params == pytest.approx(8 * fsdp.params, rel=1e-3)
    with pytest.raises(UserError, match="replicate_degree"):
        plan_memory(load_config("configs/llama3-8b.yaml", ["parallel.fsdp.replicate_degree=3"]), 64, "fsdp")


def test_offload_moves_state_to_host() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.zero.offload_optimizer=true"])
    z = plan_memory(cfg, 64, "zero3")
    assert z.optimizer == 0 and z.host > 0


def test_bad_inputs() -> None:
    cfg = load_config("configs/llama3-8b.yaml")
    with pytest.raises(UserError, match="world size must be >= 1"):
        plan_memory(cfg, 0, "fsdp")
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        plan_memory(cfg, 3, "fsdp")
    with pytest.raises(UserError, match="unknown strategy 'zero4'"):
        plan_memory(cfg, 8, "zero4")
    with pytest.raises(UserError, match="single runs one process"):
        plan_memory(cfg, 8, "single")


def test_format_plan_table_and_verdict() -> None:
    cfg = load_config("configs/llama3-8b.yaml")
    text = format_plan(cfg, 64, ["single", "ddp", "zero1", "zero2", "zero3", "fsdp"], device="cuda", gpu_memory_gib=80)
    assert "8.03B params" in text and "grad accum 8" in text and "GFLOP/token" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("ddp", "fsdp", "zero-"))]
    assert len(rows) == 5
    header = next(line for line in text.splitlines() if "total GiB" in line)
    end = header.index("total GiB") + len("total GiB")
    assert all(r[end - 1].isdigit() and r[end] == " " and r[end - 3] == "." for r in rows)  # aligned, 2 decimals
    assert "verdict: fits in 80 GiB on 64 ranks with" in text and "does not fit with ddp" in text
    tiny = format_plan(cfg, 64, ["ddp"], device="cuda", gpu_memory_gib=1)
    assert "does NOT fit" in tiny
    assert all(line == line.rstrip() for line in text.splitlines())


def test_zero_setup_transient_counts_for_fits() -> None:
    """Stages 1/2 initialize the whole fp32 model on each rank; stage 3 partitions at construction, so its
    set-up needs only the partitions and the largest parameter (llama3-70b fits on 64 ranks)."""
    cfg = load_config("configs/llama3-8b.yaml", ["model.preset=llama3-70b", "parallel.activation_checkpointing=full"])
    z2 = plan_memory(cfg, 64, "zero2")
    assert z2.setup == 4 * count_parameters(cfg.model) > 80 * GIB and not z2.fits(80)
    z3 = plan_memory(cfg, 64, "zero3")
    assert z3.setup < z3.total < 80 * GIB and z3.fits(80)
    assert z3.setup < 0.05 * 4 * count_parameters(cfg.model)
