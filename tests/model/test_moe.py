"""Mixture-of-Experts layer: routing, dispatch and combine against a per-token reference, balancing,
parameter accounting, and the config checks (docs/moe.md)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from bigtrain.model.config import PRESETS, ModelConfig, count_parameters, flops_per_token
from bigtrain.model.decoder import Decoder, build_on_meta, materialize
from bigtrain.model.moe import (
    GroupedExperts,
    MoE,
    MoEStats,
    grouped_mm_available,
    moe_layers,
    moe_metrics,
    reference_moe,
    update_router_biases,
)
from bigtrain.sections import parse_section
from tests.helpers import REPO, cli

TINY = {"dim": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 128, "max_seq_len": 32}


def tiny_moe(seed: int = 0, **moe: Any) -> Decoder:
    cfg = parse_section(ModelConfig, {**TINY, "moe": {"expert_hidden_dim": 32, **moe}}, "model")
    return materialize(build_on_meta(cfg), "cpu", seed=seed)


def _matmuls() -> list[str]:
    return ["loop", "grouped"] if grouped_mm_available() else ["loop"]


@pytest.mark.parametrize("matmul", _matmuls())
@pytest.mark.parametrize(("top_k", "num_experts", "router", "shared"), [
    (1, 4, "softmax", 0), (2, 8, "softmax", 0), (8, 8, "softmax", 1), (2, 8, "sigmoid", 1), (1, 4, "sigmoid", 0),
])
def test_moe_layer_equals_per_token_reference(matmul: str, top_k: int, num_experts: int, router: str,
                                              shared: int) -> None:
    """Forward and every gradient (experts, shared experts, router, input) within 1e-6 in fp32."""
    model = tiny_moe(num_experts=num_experts, top_k=top_k, router=router, num_shared_experts=shared,
                     normalize_topk=top_k > 1, expert_matmul=matmul)
    moe = model.layers["0"].ffn
    assert isinstance(moe, MoE)
    x = torch.randn(3, 7, TINY["dim"], generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn_like(x)
    results = []
    for fn in (moe, lambda t: reference_moe(moe, t)):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * grad_out).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
        results.append((y.detach(), xi.grad, grads))
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=1e-6, msg=name)
    # Every token reached exactly top_k experts (dropless).
    counts = moe.last_stats[:num_experts]
    assert counts.sum().item() == x.shape[0] * x.shape[1] * top_k


def test_grouped_and_loop_matmuls_agree() -> None:
    if not grouped_mm_available():
        pytest.skip("torch._grouped_mm is missing from this torch; the loop is the only path")
    x = torch.randn(2, 16, TINY["dim"], generator=torch.Generator().manual_seed(2))
    outs = [tiny_moe(expert_matmul=m).layers["1"].ffn(x) for m in ("loop", "grouped")]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_dense_model_unchanged_without_moe_section() -> None:
    """No moe section: the same modules, names and weights as before MoE existed."""
    cfg = parse_section(ModelConfig, TINY, "model")
    model = materialize(build_on_meta(cfg), "cpu", seed=0)
    assert cfg.moe is None and model.moe_stats is None and not moe_layers(model)
    names = {n for n, _ in model.named_parameters()}
    assert "layers.0.ffn.w1.weight" in names and not any("router" in n or "experts" in n for n in names)
    assert count_parameters(cfg, active=True) == count_parameters(cfg)


def test_first_dense_layers_and_parameter_names() -> None:
    model = tiny_moe(num_experts=4, top_k=2, first_dense_layers=1, num_shared_experts=1, load_balance="bias")
    names = {n for n, _ in model.named_parameters()}
    assert "layers.0.ffn.w1.weight" in names  # dense
    assert {"layers.1.ffn.router.gate.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.experts.w2",
            "layers.1.ffn.experts.w3", "layers.1.ffn.shared.w1.weight"} <= names
    # The routing bias is model state (checkpointed), not a parameter.
    assert "layers.1.ffn.router.expert_bias" in model.state_dict()
    assert "layers.1.ffn.router.expert_bias" not in names
    # Counting matches the module exactly (tied embedding once).
    cfg = model.cfg
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_active_parameters_and_flops_of_presets() -> None:
    """Total vs active parameters of the MoE presets (OLMoE-1B-7B: ~6.9B total, ~1.3B active)."""
    olmoe = parse_section(ModelConfig, {"preset": "olmoe-1b-7b"}, "model")
    assert 6.8e9 < count_parameters(olmoe) < 7.0e9
    assert 1.2e9 < count_parameters(olmoe, active=True) < 1.35e9
    qwen = parse_section(ModelConfig, {"preset": "qwen3-30b-a3b"}, "model")
    assert 29e9 < count_parameters(qwen) < 31e9 and 2.5e9 < count_parameters(qwen, active=True) < 3.5e9
    # moe-debug has the dense debug model's active parameters plus its routers.
    moe_debug = parse_section(ModelConfig, {"preset": "moe-debug"}, "model")
    debug = parse_section(ModelConfig, {"preset": "debug"}, "model")
    routers = moe_debug.num_layers * moe_debug.dim * moe_debug.moe.num_experts
    assert count_parameters(moe_debug, active=True) == count_parameters(debug) + routers
    # MFU counts what a token computes: the active parameters.
    assert flops_per_token(moe_debug, 64) == pytest.approx(flops_per_token(debug, 64) + 6 * routers)
    # A preset's moe keys are overridden one at a time.
    four = parse_section(ModelConfig, {"preset": "moe-debug", "moe": {"top_k": 4}}, "model")
    assert four.moe.top_k == 4 and four.moe.num_experts == PRESETS["moe-debug"]["moe"]["num_experts"]


def test_training_forward_adds_aux_loss_and_records_statistics() -> None:
    model = tiny_moe(num_experts=4, top_k=2, aux_loss_weight=0.5, router_z_loss=0.01)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    model.eval()
    plain = model(tokens, tokens)
    assert model.moe_stats is not None and not model.moe_stats.since_log  # evaluation records nothing
    model.train()
    with_aux = model(tokens, tokens)
    aux = sum(m.aux_loss for _, m in moe_layers(model))
    torch.testing.assert_close(with_aux, plain + aux)
    assert aux.item() > 0
    record = moe_metrics(model.moe_stats, moe_layers(model))
    assert set(record) == {f"moe_{k}/layers.{i}" for k in ("imbalance", "aux_loss", "z_loss", "entropy")
                           for i in (0, 1)} | {"moe_imbalance_max"}
    assert 1.0 <= record["moe_imbalance_max"] <= 4.0
    assert 0 < record["moe_entropy/layers.0"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert not model.moe_stats.since_log  # read and reset


def _skewed_imbalance(load_balance: str, steps: int = 150) -> float:
    """Train one MoE layer on a stream whose tokens all lean toward expert 0; the mean max/mean
    tokens-per-expert ratio over the last 30 steps."""
    torch.manual_seed(0)
    model = tiny_moe(num_experts=4, top_k=1, normalize_topk=False, load_balance=load_balance,
                     aux_loss_weight=0.1, bias_update_rate=0.02)
    moe = model.layers["0"].ffn
    assert isinstance(moe, MoE)
    gen = torch.Generator().manual_seed(4)
    direction = torch.randn(TINY["dim"], generator=gen)
    with torch.no_grad():
        moe.router.gate.weight[0] += 0.5 * direction / direction.norm()  # expert 0 attracts the skewed tokens
    target = torch.nn.Linear(TINY["dim"], TINY["dim"])
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    stats, layers = MoEStats(), [("layers.0", moe)]
    ratios = []
    for step in range(steps):
        x = torch.randn(64, TINY["dim"], generator=gen) + 2.0 * direction / direction.norm()
        y = moe(x)
        loss = torch.nn.functional.mse_loss(y, target(x).detach()) + moe.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.add("layers.0", moe.last_stats)
        update_router_biases(stats, layers)
        if step >= steps - 30:
            ratios.append(moe_metrics(stats, layers)["moe_imbalance/layers.0"])
        else:
            stats.since_log.clear()
    return sum(ratios) / len(ratios)


def test_balancing_reduces_load_imbalance_on_a_skewed_stream() -> None:
    none = _skewed_imbalance("none")
    aux = _skewed_imbalance("aux_loss")
    bias = _skewed_imbalance("bias")
    assert none > 2.5, f"the stream is not skewed enough to test balancing: imbalance {none:.2f} without it"
    assert aux < 0.7 * none, (none, aux)
    assert bias < 0.7 * none, (none, bias)


def test_bias_update_skipped_steps_and_reduce() -> None:
    model = tiny_moe(num_experts=4, top_k=1, normalize_topk=False, load_balance="bias", bias_update_rate=0.1)
    layers = moe_layers(model)
    stats = MoEStats()
    counts = torch.tensor([10.0, 0.0, 2.0, 4.0])
    stats.add("layers.0", torch.cat([counts, torch.zeros(3), torch.ones(1)]))
    update_router_biases(stats, layers[:1], apply=False)  # a skipped step forgets its counts
    assert not stats.since_update and layers[0][1].router.expert_bias.abs().sum() == 0
    stats.add("layers.0", torch.cat([counts, torch.zeros(3), torch.ones(1)]))
    seen = []
    update_router_biases(stats, layers[:1], reduce=lambda t: seen.append(t.clone()) or t * 2)
    assert len(seen) == 1  # one collective for all layers
    # Mean load 4: expert 3 is balanced.
    torch.testing.assert_close(layers[0][1].router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.moe.top_k=9"], "model.moe.top_k: 9 exceeds model.moe.num_experts=8"),
    (["model.moe.first_dense_layers=4"], "leaves no MoE layer"),
    (["model.moe.router=topk"], "model.moe.router"),
    (["model.moe.num_experts=0"], "model.moe.num_experts"),
    (["model.moe.top_k=1"], "normalize_topk"),
    (["parallel.strategy=zero"], "use parallel.strategy=fsdp"),
])
def test_bad_moe_configs_exit_2(overrides: list[str], expected: str) -> None:
    result = cli("config", "check", str(REPO / "configs" / "moe-debug.yaml"), *overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_moe_takes_tensor_parallel_and_refuses_pipeline_parallel() -> None:
    moe_debug = str(REPO / "configs" / "moe-debug.yaml")
    result = cli("config", "check", moe_debug, "parallel.strategy=fsdp", "parallel.pipeline_parallel=2",
                 "--world-size", "2")
    assert result.returncode == 2 and "not supported for MoE models yet" in result.stderr, result.stderr
    result = cli("config", "check", moe_debug, "parallel.strategy=fsdp", "parallel.tensor_parallel=2",
                 "parallel.expert_parallel=2", "--world-size", "2")  # ep drawn from the tensor-parallel ranks
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("name", "world_size"), [("moe-debug", 1), ("olmoe-1b-7b", 64), ("qwen3-30b-a3b", 128)])
def test_moe_configs_load(name: str, world_size: int) -> None:
    result = cli("config", "check", str(REPO / "configs" / f"{name}.yaml"), "--world-size", str(world_size))
    assert result.returncode == 0, result.stderr


def test_grouped_matmul_is_traced_by_compile_in_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's shape function for torch._grouped_mm refuses fp32 (the eager CPU kernel takes it), so a
    compiled fp32 MoE layer takes the loop; bf16 keeps the grouped matmul. (Compiling a MoE layer for real takes
    ~45 s of inductor on CPU, so the suite checks the choice, not a compile.)"""
    experts = GroupedExperts(4, 16, 16)
    x = torch.zeros(8, 16)
    assert experts.use_grouped(x) == grouped_mm_available()  # eager: fp32 too
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not experts.use_grouped(x)
    assert experts.use_grouped(x.bfloat16()) == grouped_mm_available()
    with pytest.raises(RuntimeError, match="other than bf16"):
        GroupedExperts(4, 16, 16, matmul="grouped").use_grouped(x)
