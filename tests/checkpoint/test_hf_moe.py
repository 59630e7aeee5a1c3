"""Hugging Face export/import of Mixture-of-Experts models: softmax routing without shared experts is a
``MixtralForCausalLM`` (a ``Qwen3MoeForCausalLM`` with model.qk_norm); logits match transformers in fp32,
``model.init_from`` reads the folder back bit-exactly, and what the target cannot express exits 2, named.

Tiny models (dim 64, 8 experts) built by the trainer and saved at step 0; no hub access.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain.checkpoint.hf import (
    hf_architecture,
    hf_config,
    load_hf_weights,
    moe_export_problems,
    read_safetensors_dir,
    to_hf_state,
    write_safetensors,
)
from bigtrain.errors import UserError
from bigtrain.export import export_checkpoint
from bigtrain.model import ModelConfig, build_on_meta
from bigtrain.sections import parse_section
from tests.helpers import build_trainer, cli

transformers = pytest.importorskip("transformers")

SHAPE = {"vocab_size": 4096, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 128,
         "max_seq_len": 128, "tie_embeddings": False, "rope_theta": 10000.0, "norm_eps": 1e-5}
MOE = {"num_experts": 8, "top_k": 2, "expert_hidden_dim": 32}
RUN = ["data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.max_steps=1",
       "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "log.console=false", "run.device=cpu",
       "train.precision=fp32", "checkpoint.at_end=false", "run.num_threads=2"]
TOKENS = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))


def model_overrides(shape: dict[str, Any] | None = None, moe: dict[str, Any] | None = None,
                    *extra: str) -> list[str]:
    model = [f"model.{k}={v}" for k, v in (SHAPE if shape is None else shape).items()]
    model += [f"model.moe.{k}={v}" for k, v in (MOE if moe is None else moe).items()]
    if not any(e.startswith("model.qk_norm=") for e in extra):
        model.append("model.qk_norm=false")  # Mixtral (the debug presets have QK-norm, which makes Qwen3-MoE)
    return [*model, *extra, *RUN]


def random_checkpoint(out: Path, overrides: list[str]) -> tuple[Any, Path]:
    """A trainer with these overrides, its weights made non-trivial (norm gains around 1, the router and
    experts scaled up so that routing and each expert matter), saved at step 0: (trainer, checkpoint)."""
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out}", *overrides])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif ".ffn." in name:
                p.mul_(4.0)
    trainer.model.eval()
    return trainer, trainer.save_checkpoint(blocking=True)


def check_against_transformers(out: Path, arch: str, model: Any, tokens: torch.Tensor = TOKENS) -> Any:
    """The exported folder loads as ``arch`` with every weight present, and gives bigtrain's logits (1e-4, fp32)."""
    cls = getattr(transformers, arch)
    hf_model, info = cls.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_model.eval()
    with torch.no_grad():
        ours = model(tokens)
        diff = (ours - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.std().item() > 0.1  # logits of substance: a wrong mapping would show
    return hf_model


def check_init_from_round_trip(out: Path, run: Path, overrides: list[str], original: Any) -> None:
    """model.init_from=<exported folder> (the trainer's own path) reproduces every tensor bit for bit."""
    again = build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *overrides, f"model.init_from={out}"])
    ours, theirs = original.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_mixtral_export_logits_and_init_from(tmp_path: Path, demo_data: Path) -> None:
    overrides = model_overrides()
    trainer, ckpt = random_checkpoint(tmp_path / "run", overrides)
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 32)
    assert config["sliding_window"] is None
    tensors = read_safetensors_dir(out)  # the hub layout: one tensor per expert, transformers fuses them on load
    assert tensors["model.layers.1.block_sparse_moe.experts.7.w3.weight"].shape == (32, 64)
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"],
                       trainer.model.state_dict()["layers.1.ffn.experts.w2"][5])
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors
    check_against_transformers(out, "MixtralForCausalLM", trainer.model)
    check_init_from_round_trip(out, tmp_path / "run2", overrides, trainer)

    # A dense config, or another routing shape, is told what differs.
    with pytest.raises(UserError, match=r"model\.moe: config has no moe section \(a dense model\), the weights "
                                        r"have a Mixture-of-Experts \(8 experts, top-2\)"):
        load_hf_weights(out, ModelConfig(**SHAPE))
    other = parse_section(ModelConfig, {**SHAPE, "moe": {**MOE, "top_k": 4}}, "model")
    with pytest.raises(UserError, match=r"model\.moe\.top_k: config has 4, the weights have 2"):
        load_hf_weights(out, other)
    # A bias-balanced model starts from it with zero biases (exactly the Mixtral router).
    biased = load_hf_weights(out, parse_section(ModelConfig, {**SHAPE, "moe": {**MOE, "load_balance": "bias"}},
                                                "model"))
    assert torch.equal(biased["layers.1.ffn.router.expert_bias"], torch.zeros(8))


def test_qwen3_moe_export_logits_and_init_from(tmp_path: Path, demo_data: Path) -> None:
    """model.qk_norm: Qwen3-MoE, which also expresses first_dense_layers (mlp_only_layers) and normalize_topk=false."""
    moe = {**MOE, "first_dense_layers": 1, "normalize_topk": "false", "load_balance": "none"}
    overrides = model_overrides(SHAPE, moe, "model.qk_norm=true")
    trainer, ckpt = random_checkpoint(tmp_path / "run", overrides)
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    assert config["mlp_only_layers"] == [0] and config["norm_topk_prob"] is False
    assert (config["num_experts"], config["moe_intermediate_size"], config["intermediate_size"]) == (8, 32, 128)
    assert config["router_aux_loss_coef"] == 0.0
    tensors = read_safetensors_dir(out)
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense layer
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert "model.layers.1.self_attn.q_norm.weight" in tensors
    hf_model = check_against_transformers(out, "Qwen3MoeForCausalLM", trainer.model)
    assert type(hf_model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    check_init_from_round_trip(out, tmp_path / "run2", overrides, trainer)


def test_transformers_saved_qwen3_moe_reads_in_either_layout(tmp_path: Path) -> None:
    """A folder transformers itself saved (hub layout) and one with its fused in-memory expert tensors
    give the same bigtrain weights, the experts stacked in order."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    model.save_pretrained(str(tmp_path / "hub"))
    cfg = parse_section(ModelConfig, {**SHAPE, "vocab_size": 256, "ffn_hidden_dim": 96, "qk_norm": True,
                                      "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 32,
                                              "first_dense_layers": 1}}, "model")
    hub = load_hf_weights(tmp_path / "hub", cfg)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    assert hub.keys() == load_hf_weights(fused, cfg).keys()
    for name, tensor in load_hf_weights(fused, cfg).items():
        assert torch.equal(tensor, hub[name]), name
    gate_up = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(hub["layers.1.ffn.experts.w1"], gate_up[:, :32])
    assert torch.equal(hub["layers.1.ffn.experts.w3"], gate_up[:, 32:])


def test_moe_debug_preset_exports(tmp_path: Path) -> None:
    """The moe-debug preset (tied embeddings, QK-norm, 8 experts of 192) is a Qwen3MoeForCausalLM with its logits
    (written by the functions `bigtrain export` calls, without a checkpoint: the CLI path is tested above)."""
    cfg = parse_section(ModelConfig, {"preset": "moe-debug"}, "model")
    model = build_on_meta(cfg)
    model.to_empty(device="cpu")
    model.init_buffers()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a quick random fill (init_weights' seeded filler is slow at 11M parameters)
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=generator) + 0.5 if "norm" in name else
                    torch.randn(p.shape, generator=generator) * 0.05)
    model.eval()
    write_safetensors(to_hf_state(model.state_dict(), cfg), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["moe_intermediate_size"] == 192 and "lm_head.weight" not in read_safetensors_dir(tmp_path)
    check_against_transformers(tmp_path, "Qwen3MoeForCausalLM", model, TOKENS[:1, :32])


@pytest.mark.parametrize("preset,arch", [("moe-debug", "Qwen3MoeForCausalLM"),
                                         ("olmoe-1b-7b", "Qwen3MoeForCausalLM"),
                                         ("qwen3-30b-a3b", "Qwen3MoeForCausalLM")])
def test_moe_presets_map(preset: str, arch: str) -> None:
    assert hf_architecture(parse_section(ModelConfig, {"preset": preset}, "model"))[0] == arch


@pytest.mark.parametrize("extra,needles", [
    (["model.moe.num_shared_experts=1", "model.moe.load_balance=bias", "model.moe.router=sigmoid",
      "model.moe.normalize_topk=false", "model.moe.first_dense_layers=1"],
     ["MixtralForCausalLM", "model.moe.num_shared_experts=1", "model.moe.load_balance=bias",
      "model.moe.router=sigmoid", "model.moe.normalize_topk=false", "model.moe.first_dense_layers=1"]),
    (["model.qk_norm=true", "model.moe.num_shared_experts=2", "model.moe.first_dense_layers=1"],
     ["Qwen3MoeForCausalLM", "model.moe.num_shared_experts=2"]),
])
def test_inexpressible_moe_export_exits_2(extra: list[str], needles: list[str], tmp_path: Path,
                                          demo_data: Path) -> None:
    """What neither Mixtral nor Qwen3-MoE can express is named, exit 2, nothing written; --to torch still works."""
    _, ckpt = random_checkpoint(tmp_path / "run", model_overrides(SHAPE, MOE, *extra))
    proc = cli("export", str(ckpt), "--to", "hf", str(tmp_path / "hf"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    assert cli("export", str(ckpt), "--to", "torch", str(tmp_path / "model.pt")).returncode == 0


def test_problems_name_only_what_the_target_lacks() -> None:
    qwen = parse_section(ModelConfig, {**SHAPE, "qk_norm": True, "moe": {**MOE, "first_dense_layers": 1,
                                                                          "normalize_topk": False}}, "model")
    assert moe_export_problems(qwen) == []
    assert moe_export_problems(ModelConfig(**SHAPE)) == []
