"""Hugging Face Llama (and Qwen3, for model.qk_norm) export/import: HF -> bigtrain (model.init_from) -> HF is
lossless, logits match transformers, `--to torch` writes one state dict, bad input exits 2.

(Export parity from FSDP and ZeRO-3 checkpoints is in tests/checkpoint/test_reshard.py, which
already has those checkpoints.) No hub access: the reference model is built from a local config.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.hf import load_hf_weights, read_safetensors_dir, write_safetensors
from bigtrain.errors import UserError
from bigtrain.export import export_checkpoint
from bigtrain.model import ModelConfig, build_on_meta
from tests.helpers import build_trainer, cli

transformers = pytest.importorskip("transformers")

# GQA (4 query heads, 2 kv heads) and an untied output projection: both naming paths are exercised.
SHAPE = {"vocab_size": 4096, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 128,
         "max_seq_len": 128, "tie_embeddings": False, "rope_theta": 10000.0, "norm_eps": 1e-5}
RUN = ["data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.max_steps=1",
       "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "log.console=false", "run.device=cpu",
       "train.precision=fp32", "checkpoint.at_end=false", "run.num_threads=2"]


def _save_random_hf(out: Path, arch: str) -> Path:
    """A randomly initialized transformers ``{arch}ForCausalLM`` of SHAPE saved as safetensors."""
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"], intermediate_size=SHAPE["ffn_hidden_dim"],
        num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
        num_key_value_heads=SHAPE["num_kv_heads"], max_position_embeddings=SHAPE["max_seq_len"],
        head_dim=SHAPE["dim"] // SHAPE["num_heads"],
        rms_norm_eps=SHAPE["norm_eps"], tie_word_embeddings=False, rope_theta=SHAPE["rope_theta"])
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm mapping cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized transformers Llama saved as safetensors (the 'downloaded' model)."""
    return _save_random_hf(tmp_path_factory.mktemp("hf") / "llama", "Llama")


def overrides(hf_dir: Path, out: Path, *extra: str) -> list[str]:
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    if not any(e.startswith("model.qk_norm=") for e in extra):
        model.append("model.qk_norm=false")  # the Llama shape (configs/debug.yaml's preset has QK-norm)
    return [f"run.out_dir={out}", *model, *extra, f"model.init_from={hf_dir}", *RUN]


def test_import_round_trip_and_logits(hf_dir: Path, tmp_path: Path, demo_data: Path) -> None:
    trainer = build_trainer("configs/debug.yaml", overrides(hf_dir, tmp_path / "run"))
    # Imported weights give transformers' logits.
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (trainer.model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    # HF -> bigtrain checkpoint -> HF: every tensor equal.
    ckpt = trainer.save_checkpoint(blocking=True)
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf_again")
    original, again = read_safetensors_dir(hf_dir), read_safetensors_dir(out)
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    assert config["architectures"] == ["LlamaForCausalLM"] and not any("q_norm" in k for k in again)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    transformers.LlamaForCausalLM.from_pretrained(str(out))  # loadable as exported

    # --to torch: one state dict with bigtrain's names, loadable into the decoder.
    target = export_checkpoint(ckpt, "torch", tmp_path / "model.pt")
    model = build_on_meta(ModelConfig(**SHAPE))
    model.to_empty(device="cpu")
    model.init_weights(0)
    missing, unexpected = model.load_state_dict(torch.load(target, weights_only=True), strict=False)
    assert not unexpected and all(k.startswith("rope_") for k in missing)


def test_qk_norm_model_is_qwen3_both_ways(tmp_path: Path, demo_data: Path) -> None:
    """model.qk_norm=true reads a Qwen3 folder bit-exactly (logits within 1e-4 of transformers' Qwen3) and
    exports it back as an identical Qwen3ForCausalLM."""
    qwen3_dir = _save_random_hf(tmp_path / "qwen3", "Qwen3")
    trainer = build_trainer("configs/debug.yaml", overrides(qwen3_dir, tmp_path / "run", "model.qk_norm=true"))
    original = read_safetensors_dir(qwen3_dir)
    assert "model.layers.1.self_attn.k_norm.weight" in original
    ours = trainer.model.state_dict()  # bit-exact import, the non-trivial q/k norm gains included
    assert torch.equal(ours["layers.1.attn.k_norm.weight"], original["model.layers.1.self_attn.k_norm.weight"])
    hf_model = transformers.Qwen3ForCausalLM.from_pretrained(str(qwen3_dir), dtype=torch.float32).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (trainer.model(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    out = export_checkpoint(trainer.save_checkpoint(blocking=True), "hf", tmp_path / "hf_again")
    again = read_safetensors_dir(out)
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] == SHAPE["dim"] // SHAPE["num_heads"] and config["use_sliding_window"] is False
    exported = transformers.Qwen3ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (exported(tokens).logits - hf_model(tokens).logits).abs().max().item() == 0.0


def test_init_from_qk_norm_mismatch_is_named(hf_dir: Path) -> None:
    with pytest.raises(UserError, match=r"model\.qk_norm: config has True, the weights have False"):
        load_hf_weights(hf_dir, ModelConfig(**{**SHAPE, "qk_norm": True}))


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(5)}
    files = write_safetensors(tensors, tmp_path, max_shard_bytes=3 * 64 * 64 * 4)
    assert files[-1] == "model.safetensors.index.json" and len(files) == 3
    back = read_safetensors_dir(tmp_path)
    assert all(torch.equal(tensors[k], back[k]) for k in tensors)


def test_init_from_wrong_shape_lists_the_keys(hf_dir: Path) -> None:
    cfg = ModelConfig(**{**SHAPE, "dim": 128, "num_layers": 3})
    with pytest.raises(UserError) as info:
        load_hf_weights(hf_dir, cfg)
    message = str(info.value)
    assert "model.dim: config has 128, the weights have 64" in message
    assert "model.num_layers: config has 3, the weights have 2" in message


def test_init_from_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no config\.json"):
        load_hf_weights(tmp_path, ModelConfig(**SHAPE))


@pytest.mark.parametrize("args,needles", [
    (["export", "/nonexistent/ckpt", "/tmp/never"], ["does not exist"]),
    (["train", "configs/debug.yaml", "model.init_from=/nonexistent/hf", "run.out_dir=/tmp/bigtrain-never-run",
      "train.max_steps=1"], ["model.init_from", "no config.json"]),
])
def test_bad_input_exit_2(args: list[str], needles: list[str], demo_data: Path) -> None:
    proc = cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
