"""Decoder shapes, causality, meta-device build, parameter and FLOP formulas."""
from __future__ import annotations

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.model import PRESETS, ModelConfig, build_on_meta, count_parameters, flops_per_token, materialize
from bigtrain.sections import parse_section


def tiny(**kw: object) -> ModelConfig:
    base = {"vocab_size": 97, "dim": 48, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 32}
    return parse_section(ModelConfig, {**base, **kw}, "model")


def test_logits_shape_and_loss() -> None:
    torch.manual_seed(0)
    model = materialize(build_on_meta(tiny()), "cpu", seed=0)
    x = torch.randint(0, 97, (3, 16))
    assert model(x).shape == (3, 16, 97)
    loss = model(x, torch.randint(0, 97, (3, 16)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # A fresh model predicts roughly uniformly: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


@pytest.mark.parametrize("tie", [True, False])
def test_causality_future_tokens_never_change_earlier_logits(tie: bool) -> None:
    model = materialize(build_on_meta(tiny(tie_embeddings=tie)), "cpu", seed=1).double()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_meta_build_allocates_nothing_and_counts_match(qk_norm: bool) -> None:
    for name in PRESETS:
        cfg = parse_section(ModelConfig, {"preset": name, "qk_norm": qk_norm}, "model")
        model = build_on_meta(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg), name


def test_materialized_count_and_init_scale() -> None:
    cfg = tiny(tie_embeddings=False)
    model = materialize(build_on_meta(cfg), "cpu", seed=0)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    block = model.layers["0"]
    assert abs(block.attn.wq.weight.std().item() - 0.02) < 0.003
    assert block.attn.wo.weight.std().item() < 0.02 / (2 * cfg.num_layers) ** 0.5 * 1.3
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.dim))


def test_init_is_deterministic_by_seed() -> None:
    a = materialize(build_on_meta(tiny()), "cpu", seed=3)
    b = materialize(build_on_meta(tiny()), "cpu", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_gpt2_124m_params_and_flops_by_hand() -> None:
    cfg = parse_section(ModelConfig, {"preset": "gpt2-124m"}, "model")
    d, L, V, F = 768, 12, 50304, 2048
    per_block = 4 * d * d + 3 * d * F + 2 * d
    n = L * per_block + d + V * d  # tied embedding counted once
    assert count_parameters(cfg) == n == 123_587_328
    flops = flops_per_token(cfg, 1024)
    assert flops == 6 * n + 12 * L * 12 * 64 * 1024
    assert flops / 1e9 == pytest.approx(0.86, abs=0.01)


def test_untied_counts_output_projection() -> None:
    tied = parse_section(ModelConfig, {"preset": "llama-1b"}, "model")
    untied = parse_section(ModelConfig, {"preset": "llama-1b", "tie_embeddings": False}, "model")
    assert count_parameters(untied) - count_parameters(tied) == 128256 * 2048


def test_llama3_8b_parameter_count() -> None:
    cfg = parse_section(ModelConfig, {"preset": "llama3-8b"}, "model")
    assert count_parameters(cfg) == 8_030_261_248  # Meta's published Llama 3 8B count


def test_auto_ffn_dim_rounding() -> None:
    cfg = tiny(dim=256, num_heads=4, num_kv_heads=None, ffn_hidden_dim=0)
    assert cfg.ffn_dim == 704  # 8/3 * 256 = 682.7 -> next multiple of 64


def test_sequence_longer_than_window_is_rejected() -> None:
    model = materialize(build_on_meta(tiny()), "cpu", seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_debug_config_model_is_small() -> None:
    cfg = load_config("configs/debug.yaml")
    assert 1e6 <= count_parameters(cfg.model) <= 5e6


# ---------------------------------------------------------------------------------------------- QK-norm
def test_qk_norm_adds_only_ones_gains_and_keeps_the_other_weights() -> None:
    """qk_norm=true adds a head_dim gain for q and k per block (ones) and draws every other weight exactly
    as qk_norm=false does, with a per-name seed and with the global RNG (seed=None) alike."""
    cfg = tiny()
    assert cfg.qk_norm is False
    assert count_parameters(tiny(qk_norm=True)) - count_parameters(cfg) == cfg.num_layers * 2 * cfg.head_dim
    for seed in (3, None):
        torch.manual_seed(0)
        plain = materialize(build_on_meta(cfg), "cpu", seed=seed).state_dict()
        torch.manual_seed(0)
        qk = materialize(build_on_meta(tiny(qk_norm=True)), "cpu", seed=seed).state_dict()
        extra = {k for k in qk if k not in plain}
        assert extra == {f"layers.{i}.attn.{n}.weight" for i in range(cfg.num_layers) for n in ("q_norm", "k_norm")}
        assert not any("q_norm" in k for k in plain)
        assert all(torch.equal(plain[k], qk[k]) for k in plain)
        assert all(torch.equal(qk[k], torch.ones(cfg.head_dim)) for k in extra)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k() -> None:
    """The norm runs on each head's q and k before rotary: scaling wq and wk leaves the logits unchanged
    (up to eps) with qk_norm, and changes them without."""
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for qk_norm in (True, False):
        model = materialize(build_on_meta(tiny(qk_norm=qk_norm, norm_eps=1e-12)), "cpu", seed=1).double()
        with torch.no_grad():
            before = model(x)
            for block in model.layers.values():
                block.attn.wq.weight.mul_(7.0)
                block.attn.wk.weight.mul_(0.3)
            after = model(x)
        assert torch.allclose(before, after, atol=1e-9) == qk_norm


def test_qk_norm_model_is_causal_and_trains() -> None:
    model = materialize(build_on_meta(tiny(qk_norm=True)), "cpu", seed=1).double()
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    assert torch.equal(model(x)[:, :12], model(y)[:, :12])
    model(x[:, :-1], x[:, 1:]).backward()
    grad = model.layers["0"].attn.q_norm.weight.grad
    assert grad is not None and grad.abs().sum() > 0
