"""The Hugging Face Llama and Qwen3 formats: weight names, ``config.json``, safetensors files, both directions.

bigtrain's decoder *is* the Llama architecture (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, GQA), so
conversion is a renaming: no permutation of the q/k projections is needed. With ``model.qk_norm`` it
is Qwen3's (Llama plus an RMSNorm over each head's queries and keys before rotary, ``q_norm`` /
``k_norm``), written as ``Qwen3ForCausalLM``; the weight names are the same. ``bigtrain export``
(:mod:`bigtrain.export`) writes this format; ``model.init_from`` reads it (:func:`init_from_hf`).
Files are written with ``safetensors`` only; ``transformers`` is never imported here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.errors import UserError
from bigtrain.model.config import ModelConfig
from bigtrain.parallel.strategy import Strategy

DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# bigtrain name (per block: "{i}") -> Hugging Face Llama / Qwen3 name (q_norm and k_norm: Qwen3 only).
_BLOCK = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
# Hugging Face model_type -> whether the architecture has QK-norm (model.qk_norm).
_MODEL_TYPES = {"llama": False, "qwen3": True}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}"
    raise KeyError(f"no Hugging Face Llama name for bigtrain parameter {name!r}")


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in _BLOCK.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    raise KeyError(name)


def to_hf_state(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """bigtrain weights → HF Llama / Qwen3 weights (a tied output projection is written once, as the embedding)."""
    out = {}
    for name, tensor in weights.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[to_hf_name(name)] = tensor.detach().to("cpu").contiguous()
    return out


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with this shape (``Qwen3ForCausalLM`` with ``model.qk_norm``)."""
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.qk_norm:
        # Qwen3 has no mlp_bias key; its sliding-window attention stays off (every layer full attention).
        del out["mlp_bias"]
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
        out["bos_token_id"] = eos_token_id  # bigtrain marks document starts with EOS
    return out


def model_fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of an HF Llama or Qwen3 ``config.json`` (refusing what bigtrain cannot represent)."""
    model_type = hf.get("model_type") or "llama"
    if model_type not in _MODEL_TYPES:
        raise UserError(f"{where}: model_type {model_type!r} is neither 'llama' nor 'qwen3'; model.init_from takes "
                        f"Llama-format weights (or Qwen3-format, with model.qk_norm=true).")
    if hf.get("use_sliding_window"):
        raise UserError(f"{where}: sliding-window attention (use_sliding_window) is not supported by bigtrain's "
                        f"decoder (full causal attention only).")
    scaling = hf.get("rope_scaling") or {}
    params = hf.get("rope_parameters") or {}
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(f"{where}: RoPE scaling {rope_type!r} is not supported by bigtrain's decoder "
                        f"(plain RoPE only).")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: biases or a non-SiLU activation are not part of bigtrain's Llama decoder.")
    heads = int(hf["num_attention_heads"])
    if int(hf.get("head_dim") or hf["hidden_size"] // heads) * heads != int(hf["hidden_size"]):
        raise UserError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported.")
    return {
        "vocab_size": int(hf["vocab_size"]), "dim": int(hf["hidden_size"]), "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads, "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn_dim": int(hf["intermediate_size"]),
        "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_norm": _MODEL_TYPES[model_type],
    }


def _ours(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "kv_heads": cfg.kv_heads, "ffn_dim": cfg.ffn_dim, "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps,
            "tie_embeddings": cfg.tie_embeddings, "qk_norm": cfg.qk_norm}


_KEY_NAMES = {"kv_heads": "num_kv_heads", "ffn_dim": "ffn_hidden_dim"}


# ---------------------------------------------------------------------------- safetensors I/O
def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """One ``model.safetensors``, or numbered shards + ``model.safetensors.index.json`` past ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFETENSORS_FILE), metadata=meta)
        return [SAFETENSORS_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        names.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (``model.safetensors`` or an index with shards)."""
    from safetensors.torch import load_file

    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            out.update(load_file(str(path / fname)))
        return out
    if (path / SAFETENSORS_FILE).is_file():
        return load_file(str(path / SAFETENSORS_FILE))
    raise UserError(f"{path}: no {SAFETENSORS_FILE} or {INDEX_FILE}; model.init_from needs a Hugging Face folder "
                    f"with safetensors weights (e.g. written by `bigtrain export CKPT --to hf OUT`).")


# ---------------------------------------------------------------------------- import (model.init_from)
def load_hf_weights(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """bigtrain-named fp32 weights from an HF Llama or Qwen3 folder, after checking its shape equals ``cfg``."""
    folder = Path(path).expanduser()
    where = f"model.init_from={str(path)!r}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: no config.json there; give a Hugging Face Llama-format folder "
                        f"(e.g. written by `bigtrain export CKPT --to hf OUT`).")
    theirs = model_fields_from_hf(json.loads((folder / "config.json").read_text()), where)
    ours = _ours(cfg)
    diff = [f"model.{_KEY_NAMES.get(k, k)}: config has {ours[k]!r}, the weights have {theirs[k]!r}"
            for k in ours if ours[k] != theirs[k]]
    if diff:
        raise UserError(f"{where}: the weights do not fit this model:\n  " + "\n  ".join(diff) +
                        "\nSet those model.* keys to the weights' values.")
    hf = read_safetensors_dir(folder)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived, not a weight
        try:
            weights[from_hf_name(name)] = tensor.float()
        except KeyError:
            raise UserError(f"{where}: unexpected tensor {name!r} (not part of a Llama or Qwen3 decoder).") from None
    if cfg.tie_embeddings:
        weights.pop("output.weight", None)
    elif "output.weight" not in weights:
        raise UserError(f"{where}: untied model (model.tie_embeddings=false) but the weights have no lm_head.weight.")
    return weights


def init_from_hf(path: str | Path, cfg: ModelConfig, strategy: Strategy, model: nn.Module) -> None:
    """Overwrite a freshly initialized (possibly sharded) model with HF Llama / Qwen3 weights, through the strategy."""
    weights = load_hf_weights(path, cfg)
    expected = {k for k in strategy.unwrap(model).state_dict() if not k.startswith("rope_")}
    expected = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") for k in expected}
    missing = sorted(expected - set(weights))
    if missing:
        raise UserError(f"model.init_from={str(path)!r}: missing tensors {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}.")
    strategy.load_model_weights(model, weights)
    messages.say(f"initialized weights from {os.fspath(path)} ({len(weights)} tensors)")
