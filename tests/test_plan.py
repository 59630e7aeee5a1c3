"""bigtrain.plan: per-rank memory per backend, from meta-device shapes (nothing allocated)."""
from __future__ import annotations

import math

import pytest

import bigtrain.plan as plan_mod
from bigtrain.config import ConfigError, load_config
from bigtrain.errors import UserError
from bigtrain.model import count_parameters
from bigtrain.plan import GIB, activation_bytes, expert_shard_numel, ffn_activation_bytes, format_plan, plan_memory


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


# --------------------------------------------------------------------------- Mixture-of-Experts


@pytest.mark.parametrize("config,world,ep", [("configs/olmoe-1b-7b.yaml", 64, 8),
                                              ("configs/qwen3-30b-a3b.yaml", 128, 8)])
def test_moe_presets_plan_every_expert_sharded_and_fit(config: str, world: int, ep: int) -> None:
    """State counts all parameters (every expert); with ep drawn from dp_shard the per-rank share is total / world
    either way, and expert parallelism gathers only a rank's experts (smaller FSDP buffers)."""
    cfg = load_config(config)
    assert cfg.parallel.expert_parallel == ep
    n = count_parameters(cfg.model)
    plan = plan_memory(cfg, world, "fsdp")
    assert plan.params == plan.grads == pytest.approx(4 * n / world, rel=1e-3)
    assert plan.optimizer == pytest.approx(8 * n / world, rel=1e-3)
    assert plan.fits(80) and plan.total < 40 * GIB
    no_ep = plan_memory(load_config(config, ["parallel.expert_parallel=1"]), world, "fsdp")
    assert no_ep.state == pytest.approx(plan.state, rel=1e-3) and no_ep.buffers > 2 * plan.buffers
    # Expert parallelism adds one layer's all-to-all buffers (4 a k h per token of the micro-batch, bf16) and,
    # in the one block recomputed under full checkpointing, the regrouping orders (2 int64 per routed copy).
    moe, tokens = cfg.model.moe, cfg.train.micro_batch_size * cfg.data.seq_len
    assert moe is not None and cfg.parallel.activation_checkpointing == "full"
    assert plan.activations - no_ep.activations == (4 * 2 * moe.top_k * cfg.model.dim + 16 * moe.top_k) * tokens
    single = plan_memory(cfg, 1, "single", device="cpu")
    assert single.params == 4 * n  # every expert on the one rank


def test_moe_plan_text_says_total_and_active_and_leaves_zero_out() -> None:
    cfg = load_config("configs/olmoe-1b-7b.yaml")
    text = format_plan(cfg, 64, ["single", "ddp", "zero1", "zero2", "zero3", "fsdp"], device="cuda", gpu_memory_gib=80)
    assert "6.92B params total, 1.28B active per token" in text, text
    assert "64 routed per MoE layer (16 of 16 layers), top-8, expert hidden 1024; expert_parallel 8" in text
    assert "(active parameters)" in text and "ZeRO rows left out (no MoE)" in text
    assert "zero-" not in text.split("backend")[1] and "verdict: fits in 80 GiB on 64 ranks with fsdp" in text
    with pytest.raises(UserError, match="does not train Mixture-of-Experts"):
        plan_memory(cfg, 64, "zero3")


def test_moe_invalid_expert_parallel_refused() -> None:
    cfg = load_config("configs/olmoe-1b-7b.yaml")  # expert_parallel 8
    with pytest.raises(ConfigError, match="expert_parallel=8 must divide the data-, context- and tensor-parallel"):
        plan_memory(cfg, 4, "fsdp")
    assert plan_memory(cfg, 4, "ddp").params == 4 * count_parameters(cfg.model)  # ddp keeps every expert


def test_expert_shard_numel_follows_shard_moe() -> None:
    """ep = 1: dim 0 with its block (padded); ep > 1: experts / ep, then dim 0 over the rest when the local experts
    split evenly, else dim 1 when it does (parallel/ep.py shard_moe), else dim 0 padded."""
    assert expert_shard_numel((6, 64, 32), 1, 4) == 2 * 64 * 32  # ceil(6 / 4) experts
    assert expert_shard_numel((8, 64, 32), 1, 16) == 1 * 64 * 32  # fewer experts than ranks: one on each (padding)
    assert expert_shard_numel((8, 64, 32), 2, 4) == 2 * 64 * 32  # 4 local experts over 2
    assert expert_shard_numel((6, 64, 32), 2, 4) == 3 * 32 * 32  # 3 local experts: by hidden unit
    assert expert_shard_numel((6, 63, 32), 2, 4) == 2 * 63 * 32  # neither splits: dim 0, padded
    assert expert_shard_numel((8, 64, 32), 8, 8) == 64 * 32  # ep over all: one expert each, whole


def test_moe_activations_by_hand_and_first_dense_layers() -> None:
    """moe-debug (8 experts of half the dense SwiGLU, top-2) in fp32 without checkpointing: the dense part of each
    block as for debug, the feed-forward as ffn_activation_bytes; leading dense blocks keep the dense SwiGLU."""
    over = ["data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_tokens=2048",
            "model.qk_norm=false"]  # the by-hand block formula below is the plain attention's
    cfg = load_config("configs/moe-debug.yaml", over)
    dense = load_config("configs/debug.yaml", over)
    assert cfg.model.moe is not None
    a, h, k, e, g, f = 4, cfg.model.dim, 2, 8, cfg.model.moe.expert_hidden_dim, dense.model.ffn_dim
    ffn = 8 * e + (28 + a) * k + 12 + 3 * a * k * h + 4 * a * k * g
    assert ffn_activation_bytes(cfg.model, a) == ffn
    tokens = 8 * 256
    delta = activation_bytes(cfg, a) - activation_bytes(dense, a)
    assert delta == 4 * (ffn - 4 * a * f) * tokens
    first = load_config("configs/moe-debug.yaml", [*over, "model.moe.first_dense_layers=1"])
    assert activation_bytes(first, a) - activation_bytes(dense, a) == 3 * (ffn - 4 * a * f) * tokens
    single = plan_memory(first, 1, "single", device="cpu")
    assert single.params == 4 * count_parameters(first.model)
    # Full checkpointing recomputes the largest block (a MoE one).
    ckpt = load_config("configs/moe-debug.yaml", [*over, "model.moe.first_dense_layers=1",
                                                  "parallel.activation_checkpointing=full"])
    per_block = 2 * (8 + a) * h + 5 * a * h + ffn
    assert activation_bytes(ckpt, a) == (4 * 4 * h + per_block + (8 + a) * h + (4 + a) * 4096) * tokens


def test_moe_ffn_activations_match_what_autograd_keeps() -> None:
    """ffn_activation_bytes is the bytes of the tensors autograd still holds after a MoE forward (grouped path,
    fp32 and bf16, with shared experts)."""
    import gc
    import weakref

    import torch

    from bigtrain.model.moe import MoE

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    held: weakref.WeakSet[Held] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> Held:
        box = Held(t)
        held.add(box)
        return box

    for dtype, extra in ((torch.float32, []), (torch.bfloat16, ["model.moe.num_shared_experts=1"])):
        cfg = load_config("configs/moe-debug.yaml", ["model.dim=64", "model.num_heads=4", "model.num_kv_heads=4",
                                                     "model.moe.expert_hidden_dim=48", *extra]).model
        torch.manual_seed(0)
        moe = MoE(cfg)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.05)
        moe = moe.to(dtype)
        tokens = 512
        x = torch.randn(1, tokens, cfg.dim, dtype=dtype, requires_grad=True)
        skip = {p.data_ptr() for p in moe.parameters()} | {x.data_ptr()}

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            loss = moe(x).float().sum() + moe.aux_loss
        moe.aux_loss = moe.last_stats = None
        gc.collect()
        live = {b.t.untyped_storage().data_ptr(): b.t.untyped_storage().nbytes() for b in list(held)
                if b.t.data_ptr() not in skip}
        del loss
        held.clear()
        planned = tokens * ffn_activation_bytes(cfg, dtype.itemsize)
        # Exact per token; the balancing loss also keeps two fp32 vectors of num_experts per layer.
        assert cfg.moe is not None and sum(live.values()) - planned == 2 * 4 * cfg.moe.num_experts, (dtype, extra)
