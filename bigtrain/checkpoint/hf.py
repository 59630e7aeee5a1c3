"""The Hugging Face Llama, Qwen3, Mixtral and Qwen3-MoE formats: weight names, ``config.json``, safetensors
files, both directions.

bigtrain's decoder *is* the Llama architecture (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, GQA), so
conversion is a renaming: no permutation of the q/k projections is needed. With ``model.qk_norm`` it
is Qwen3's (Llama plus an RMSNorm over each head's queries and keys before rotary, ``q_norm`` /
``k_norm``), written as ``Qwen3ForCausalLM``; the weight names are the same.

A Mixture-of-Experts model (``model.moe``, :mod:`bigtrain.model.moe`) is written as
``MixtralForCausalLM`` (no QK-norm) or ``Qwen3MoeForCausalLM`` (``model.qk_norm``): both route with a
softmax over the experts, pick the top k on those scores and weight each expert's SwiGLU output by its
score (Mixtral always renormalizes the k weights, Qwen3-MoE when ``norm_topk_prob``); Qwen3-MoE keeps
leading dense layers as ``mlp_only_layers``. bigtrain's stacked expert weights ``ffn.experts.w1/w3/w2``
[E, out, in] are written per expert, in the hub layout (``block_sparse_moe.experts.{j}.w1.weight`` /
``mlp.experts.{j}.gate_proj.weight``), which transformers 5 fuses on load; the fused layout
(``mlp.experts.gate_up_proj`` / ``down_proj``) is read too. What neither architecture has (shared
experts, a routing bias, a sigmoid router, ...) is refused by :func:`hf_architecture`.

``bigtrain export`` (:mod:`bigtrain.export`) writes these formats; ``model.init_from`` reads them
(:func:`init_from_hf`). Files are written with ``safetensors`` only; ``transformers`` is never imported here.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.errors import UserError
from bigtrain.model.config import ModelConfig
from bigtrain.model.moe import hidden_dim, is_moe_layer
from bigtrain.parallel.strategy import Strategy

DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# bigtrain name (per block: "{i}") -> Hugging Face Llama / Qwen3 name (q_norm and k_norm: Qwen3 only).
# The ffn names are also Qwen3-MoE's dense layers (mlp_only_layers).
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
_MODEL_TYPES = {"llama": False, "qwen3": True, "mixtral": False, "qwen3_moe": True}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


class _MoELayout:
    """How one Hugging Face MoE architecture names a sparse block's tensors (hub layout: one tensor per expert)."""

    def __init__(self, arch: str, block: str, experts: tuple[str, str, str]) -> None:
        self.arch = arch
        self.block = block  # the attribute of the sparse feed-forward in the hub checkpoints
        self.experts = experts  # per-expert names of bigtrain's w1 (gate), w3 (up), w2 (down)


# Hugging Face MoE model_type -> its layout. (transformers 5 keeps the experts fused in memory,
# mlp.experts.gate_up_proj [E, 2*hidden, dim] and mlp.experts.down_proj, and converts the hub layout on load.)
_MOE_LAYOUTS = {
    "mixtral": _MoELayout("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": _MoELayout("Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj")),
}
_EXPERT_PARAMS = ("w1", "w3", "w2")  # bigtrain's ffn.experts.* in the layouts' order


def to_hf_name(name: str) -> str:
    """The Hugging Face name of a bigtrain tensor outside the MoE blocks (those: :func:`to_hf_state`)."""
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


def moe_export_problems(cfg: ModelConfig) -> list[str]:
    """What of ``cfg.moe`` its Hugging Face architecture (Mixtral, or Qwen3-MoE with ``model.qk_norm``)
    cannot express; empty when it maps (or for a dense model)."""
    moe = cfg.moe
    if moe is None:
        return []
    out = []
    if moe.num_shared_experts:
        out.append(f"model.moe.num_shared_experts={moe.num_shared_experts}: shared experts (neither Mixtral nor "
                   f"Qwen3-MoE has them)")
    if moe.router != "softmax":
        out.append(f"model.moe.router={moe.router}: Mixtral and Qwen3-MoE score the experts with a softmax")
    if moe.load_balance == "bias":
        out.append("model.moe.load_balance=bias: a per-expert routing bias in the top-k selection (Mixtral and "
                   "Qwen3-MoE select on the plain router scores)")
    if not cfg.qk_norm:
        if not moe.normalize_topk:
            out.append("model.moe.normalize_topk=false: Mixtral always renormalizes the top-k weights (Qwen3-MoE "
                       "can skip it, but has QK-norm: model.qk_norm=true)")
        if moe.first_dense_layers:
            out.append(f"model.moe.first_dense_layers={moe.first_dense_layers}: Mixtral has no dense layers "
                       f"(Qwen3-MoE has them, as mlp_only_layers, but has QK-norm: model.qk_norm=true)")
    return out


def hf_architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) ``cfg`` is exported as; a UserError naming what a MoE model's target
    cannot express (:func:`moe_export_problems`)."""
    if cfg.moe is None:
        return ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")
    model_type = "qwen3_moe" if cfg.qk_norm else "mixtral"
    arch = _MOE_LAYOUTS[model_type].arch
    problems = moe_export_problems(cfg)
    if problems:
        raise UserError(f"bigtrain export --to hf: this Mixture-of-Experts model has no Hugging Face equivalent: its "
                        f"architecture would be {arch} (model.qk_norm={str(cfg.qk_norm).lower()}), which cannot "
                        f"express:\n  " + "\n  ".join(problems) +
                        "\nExport it with --to torch (one state dict, bigtrain's names) instead.")
    return arch, model_type


def to_hf_state(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """bigtrain weights → HF Llama / Qwen3 / Mixtral / Qwen3-MoE weights (a tied output projection is written
    once, as the embedding; stacked experts one tensor per expert, as views of the stack that
    :func:`write_safetensors` copies out a shard at a time)."""
    _, model_type = hf_architecture(cfg)
    layout = _MOE_LAYOUTS.get(model_type)
    out = {}
    for name, tensor in weights.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        parts = name.split(".", 2)
        if layout is not None and len(parts) == 3 and parts[0] == "layers" and is_moe_layer(cfg, int(parts[1])):
            prefix = f"model.layers.{parts[1]}.{layout.block}"
            if parts[2] == "ffn.router.gate.weight":
                out[f"{prefix}.gate.weight"] = tensor
                continue
            stacked = parts[2].removeprefix("ffn.experts.")
            if stacked in _EXPERT_PARAMS:
                theirs = layout.experts[_EXPERT_PARAMS.index(stacked)]
                for j, expert in enumerate(tensor.unbind(0)):
                    out[f"{prefix}.experts.{j}.{theirs}.weight"] = expert
                continue
            if parts[2].startswith("ffn."):
                raise KeyError(f"no Hugging Face {layout.arch} name for bigtrain tensor {name!r}")
        out[to_hf_name(name)] = tensor
    return out


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with this shape (``Qwen3ForCausalLM`` with ``model.qk_norm``;
    ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` for a MoE model)."""
    if cfg.moe is not None:
        return _moe_hf_config(cfg, eos_token_id=eos_token_id, dtype=dtype)
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


def _moe_hf_config(cfg: ModelConfig, *, eos_token_id: int | None, dtype: str) -> dict[str, Any]:
    """``config.json`` of the Mixtral / Qwen3-MoE model ``cfg`` maps onto (the hub's keys)."""
    arch, model_type = hf_architecture(cfg)
    moe = cfg.moe
    assert moe is not None
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "use_cache": True, "torch_dtype": dtype,
        "num_experts_per_tok": moe.top_k, "output_router_logits": False,
        # Training only (transformers adds it to the loss with output_router_logits): bigtrain's weight.
        "router_aux_loss_coef": moe.aux_loss_weight if moe.load_balance == "aux_loss" else 0.0,
    }
    if model_type == "mixtral":
        # Every layer sparse; the experts' hidden size is intermediate_size; full attention (no sliding window).
        out.update(intermediate_size=hidden_dim(cfg), num_local_experts=moe.num_experts, sliding_window=None,
                   router_jitter_noise=0.0)
    else:
        out.update(intermediate_size=cfg.ffn_dim, moe_intermediate_size=hidden_dim(cfg), num_experts=moe.num_experts,
                   norm_topk_prob=moe.normalize_topk, decoder_sparse_step=1,
                   mlp_only_layers=list(range(moe.first_dense_layers)), attention_bias=False,
                   use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
        out["bos_token_id"] = eos_token_id  # bigtrain marks document starts with EOS
    return out


def model_fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of an HF Llama, Qwen3, Mixtral or Qwen3-MoE ``config.json`` (refusing what bigtrain
    cannot represent). ``moe`` is None or the routing shape (:func:`_moe_fields`); ``ffn_dim`` is absent
    when the model has no dense feed-forward. Every value read is type-checked: a missing, null or mistyped
    one is a UserError naming the key (``where`` names the file)."""
    model_type = hf.get("model_type")
    model_type = "llama" if model_type in (None, "") else model_type
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
        raise UserError(f"{where}: model_type {_show(model_type)} is not one of {', '.join(map(repr, _MODEL_TYPES))}; "
                        f"model.init_from takes Llama-format weights (Qwen3-format with model.qk_norm=true; "
                        f"Mixtral or Qwen3-MoE for a model.moe model).")
    if (_bool_field(hf, "use_sliding_window", where)
            or (model_type == "mixtral" and hf.get("sliding_window") is not None)):
        raise UserError(f"{where}: sliding-window attention (use_sliding_window / sliding_window) is not supported "
                        f"by bigtrain's decoder (full causal attention only).")
    scaling = _object_field(hf, "rope_scaling", where)
    params = _object_field(hf, "rope_parameters", where)
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(f"{where}: RoPE scaling {_show(rope_type)} is not supported by bigtrain's decoder "
                        f"(plain RoPE only).")
    if (_bool_field(hf, "attention_bias", where) or _bool_field(hf, "mlp_bias", where)
            or hf.get("hidden_act", "silu") != "silu"):
        raise UserError(f"{where}: biases or a non-SiLU activation are not part of bigtrain's Llama decoder.")
    heads = _int_field(hf, "num_attention_heads", where)
    hidden = _int_field(hf, "hidden_size", where)
    if _int_field(hf, "head_dim", where, default=hidden // heads) * heads != hidden:
        raise UserError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported.")
    theta_from = ("rope_parameters", params) if params.get("rope_theta") is not None else ("", hf)
    fields: dict[str, Any] = {
        "vocab_size": _int_field(hf, "vocab_size", where), "dim": hidden,
        "num_layers": _int_field(hf, "num_hidden_layers", where),
        "num_heads": heads, "kv_heads": _int_field(hf, "num_key_value_heads", where, default=heads),
        "ffn_dim": _int_field(hf, "intermediate_size", where),
        "rope_theta": _float_field(theta_from[1], "rope_theta", where, default=10000.0, within=theta_from[0]),
        "norm_eps": _float_field(hf, "rms_norm_eps", where, default=1e-6),
        "tie_embeddings": _bool_field(hf, "tie_word_embeddings", where),
        "qk_norm": _MODEL_TYPES[model_type], "moe": None,
    }
    if model_type in _MOE_LAYOUTS:
        fields["moe"] = _moe_fields(hf, model_type, fields["num_layers"], where)
        if not fields["moe"]["first_dense_layers"]:
            del fields["ffn_dim"]  # Mixtral's intermediate_size is the experts'; Qwen3-MoE's then unused
    return fields


def _moe_fields(hf: dict[str, Any], model_type: str, num_layers: int, where: str) -> dict[str, Any]:
    """The routing shape of a Mixtral / Qwen3-MoE ``config.json``, as model.moe keys (compared by :func:`_moe_ours`)."""
    if model_type == "mixtral":
        key = "num_experts" if hf.get("num_local_experts") is None and "num_experts" in hf else "num_local_experts"
        return {"num_experts": _int_field(hf, key, where, default=8),
                "top_k": _int_field(hf, "num_experts_per_tok", where, default=2),
                "expert_hidden_dim": _int_field(hf, "intermediate_size", where), "first_dense_layers": 0,
                "normalize_topk": True, "router": "softmax", "num_shared_experts": 0}
    key = "num_local_experts" if hf.get("num_experts") is None and "num_local_experts" in hf else "num_experts"
    experts = _int_field(hf, key, where, default=128, minimum=0)
    step = _int_field(hf, "decoder_sparse_step", where, default=1)
    mlp_only_layers = hf.get("mlp_only_layers") or []
    if not isinstance(mlp_only_layers, list) or not all(_is_int(i) for i in mlp_only_layers):
        raise UserError(f"{where}: mlp_only_layers is {_show(mlp_only_layers)}; expected a list of layer numbers.")
    mlp_only = set(mlp_only_layers)
    dense = [i for i in range(num_layers) if i in mlp_only or experts <= 0 or (i + 1) % step != 0]
    if dense != list(range(len(dense))) or len(dense) == num_layers:
        raise UserError(f"{where}: dense layers {dense} (mlp_only_layers / decoder_sparse_step) are not a leading "
                        f"run followed by MoE layers; bigtrain's model.moe.first_dense_layers makes only the first "
                        f"layers dense.")
    return {"num_experts": experts, "top_k": _int_field(hf, "num_experts_per_tok", where, default=8),
            "expert_hidden_dim": _int_field(hf, "moe_intermediate_size", where), "first_dense_layers": len(dense),
            "normalize_topk": _bool_field(hf, "norm_topk_prob", where), "router": "softmax", "num_shared_experts": 0}


# ---------------------------------------------------------------------------- config.json values, type-checked
def _show(value: Any) -> str:
    """A JSON value for a one-line message: its JSON text, cut short, and its type."""
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else "an integer"
            if isinstance(value, int) else "a number" if isinstance(value, float) else "a string"
            if isinstance(value, str) else "a list" if isinstance(value, list) else "an object"
            if isinstance(value, dict) else type(value).__name__)
    if value is None:
        return kind
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(hf: dict[str, Any], key: str, where: str, *, default: int | None = None, minimum: int = 1) -> int:
    """``hf[key]``: a JSON integer >= ``minimum`` (absent or null: ``default``, where there is one)."""
    value = hf.get(key)
    if value is None:
        if default is not None:
            return default
        raise UserError(f"{where}: {key} is {'null' if key in hf else 'missing'}; a Hugging Face config.json "
                        f"gives it as an integer >= {minimum}.")
    if not _is_int(value) or value < minimum:
        raise UserError(f"{where}: {key} is {_show(value)}; expected an integer >= {minimum}.")
    return int(value)


def _float_field(hf: dict[str, Any], key: str, where: str, *, default: float, within: str = "") -> float:
    """``hf[key]``: a finite positive JSON number (absent or null: ``default``)."""
    value = hf.get(key)
    if value is None:
        return default
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: {within + '.' if within else ''}{key} is {_show(value)}; expected a finite "
                        f"positive number.")
    return float(value)


def _bool_field(hf: dict[str, Any], key: str, where: str) -> bool:
    """``hf[key]``: true or false (absent or null: false)."""
    value = hf.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UserError(f"{where}: {key} is {_show(value)}; expected true or false.")
    return value


def _object_field(hf: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``hf[key]``: a JSON object (absent or null: empty)."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} is {_show(value)}; expected an object or null.")
    return value


def _moe_ours(cfg: ModelConfig) -> dict[str, Any] | None:
    moe = cfg.moe
    if moe is None:
        return None
    return {"num_experts": moe.num_experts, "top_k": moe.top_k, "expert_hidden_dim": hidden_dim(cfg),
            "first_dense_layers": moe.first_dense_layers, "normalize_topk": moe.normalize_topk, "router": moe.router,
            "num_shared_experts": moe.num_shared_experts}


def _ours(cfg: ModelConfig) -> dict[str, Any]:
    out = {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
           "kv_heads": cfg.kv_heads, "ffn_dim": cfg.ffn_dim, "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps,
           "tie_embeddings": cfg.tie_embeddings, "qk_norm": cfg.qk_norm, "moe": _moe_ours(cfg)}
    if cfg.moe is not None and not cfg.moe.first_dense_layers:
        del out["ffn_dim"]  # no dense feed-forward
    return out


_KEY_NAMES = {"kv_heads": "num_kv_heads", "ffn_dim": "ffn_hidden_dim"}


def _shape_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """One line per model.* key where the config and the weights disagree."""
    diff = []
    for key in ours:
        if key == "moe" or key not in theirs or ours[key] == theirs[key]:
            continue
        diff.append(f"model.{_KEY_NAMES.get(key, key)}: config has {ours[key]!r}, the weights have {theirs[key]!r}")
    mine, other = ours["moe"], theirs["moe"]
    if (mine is None) != (other is None):
        def show(moe: dict[str, Any] | None) -> str:
            return ("no moe section (a dense model)" if moe is None else
                    f"a Mixture-of-Experts ({moe['num_experts']} experts, top-{moe['top_k']})")
        diff.append(f"model.moe: config has {show(mine)}, the weights have {show(other)}")
    elif mine is not None and other is not None:
        diff += [f"model.moe.{key}: config has {mine[key]!r}, the weights have {other[key]!r}"
                 for key in mine if mine[key] != other[key]]
    return diff


# ---------------------------------------------------------------------------- safetensors I/O
def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """One ``model.safetensors``, or numbered shards + ``model.safetensors.index.json`` past ``max_shard_bytes``.

    Every file gets the mode of any other new file (``0o666 & ~umask``): safetensors writes through a private
    temporary file (mode 0600) that it renames into place."""
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
    mode = 0o666 & ~_umask()
    if len(shards) == 1:
        save_file(_owning(shards[0]), str(out_dir / SAFETENSORS_FILE), metadata=meta)
        os.chmod(out_dir / SAFETENSORS_FILE, mode)
        return [SAFETENSORS_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(_owning(shard), str(out_dir / fname), metadata=meta)
        os.chmod(out_dir / fname, mode)
        names.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]


def _umask() -> int:
    """This process's umask (Linux: read from /proc, which leaves it alone; elsewhere set and put straight back)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owning(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard with every view of a larger tensor (one expert of a stack) copied out, one shard at a time:
    safetensors refuses tensors that share memory (older versions even disjoint ones)."""
    def whole(t: torch.Tensor) -> bool:
        storage = t.untyped_storage()
        return t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()

    return {name: t if whole(t) else t.clone() for name, t in shard.items()}


_MAX_JSON_BYTES = 64 * 1024**2  # config.json or an index: real ones are kilobytes (a 1T-parameter index: ~10 MB)
_MAX_HEADER_BYTES = 100 * 1000**2  # safetensors' own limit on a header
_HINT = "model.init_from needs a Hugging Face folder with safetensors weights (e.g. `bigtrain export CKPT --to hf OUT`)"


def _file_problem(file: Path) -> str | None:
    """Why ``file`` cannot be read as a regular file (missing, a directory, a FIFO, ...); None when it can.
    Checked before opening it: opening a FIFO blocks until someone writes to it."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return "is missing" + (" (a dangling symlink)" if file.is_symlink() else "")
    except OSError as exc:
        return "is a symlink loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # a NUL byte in the name
        return f"is not a valid file name ({exc})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def _read_json(file: Path, label: str) -> Any:
    """The JSON value in ``file`` (a regular file, checked), or a one-line UserError starting with ``label``."""
    try:
        size = file.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise UserError(f"{label}: {size:,} bytes is far too large for this JSON file (at most "
                            f"{_MAX_JSON_BYTES:,}); {_HINT}.")
        data = file.read_bytes()
    except OSError as exc:
        raise UserError(f"{label}: cannot be read ({exc.strerror or exc}).") from None
    if not data.strip():
        raise UserError(f"{label}: the file is empty (expected a JSON object); {_HINT}.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); JSON files "
                        f"are UTF-8: re-save it as UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except RecursionError:
        raise UserError(f"{label}: JSON nested too deeply to parse (not a Hugging Face JSON file).") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (its advice, after a ';', is Python's)
        raise UserError(f"{label}: not valid JSON ({_first_line(exc).split(';')[0]}).") from None


def _weight_file(folder: Path, name: str, named_by: Path) -> Path:
    """``folder/name`` resolved, if it is a file of ``folder`` itself; a UserError naming it otherwise.

    The folder is untrusted input (a download): its index could name ``../x`` or ``/x``, or a weight file could
    be a symlink that points elsewhere, and the tensors read would come from a file the user never gave.
    Resolving first (symlinks, ``..``) and comparing the parent catches all of them."""
    try:
        target = (folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13); ValueError: NUL
        raise UserError(f"{named_by}: weight file {name!r} cannot be resolved ({exc}).") from None
    if target.parent != folder.resolve():
        raise UserError(f"{named_by}: weight file {name!r} is outside {folder} (it resolves to {target}); "
                        f"model.init_from reads weights only from files in the folder itself. Copy the files into "
                        f"the folder (for a Hugging Face cache snapshot, whose files are symlinks into its blobs/ "
                        f"folder: `hf download REPO --local-dir DIR`).")
    return target


def _index_files(folder: Path, where: str) -> list[tuple[str, Path]]:
    """(name, resolved path) of each weight file ``model.safetensors.index.json`` lists, all checked before any is
    read: a file of the folder itself, present and a regular file."""
    index = folder / INDEX_FILE
    label = f"{where}: {INDEX_FILE}"
    content = _read_json(index, label)
    if not isinstance(content, dict) or "weight_map" not in content:
        raise UserError(f"{label}: not a safetensors index (a JSON object with a weight_map); it is "
                        f"{_show(content) if not isinstance(content, dict) else 'an object without weight_map'}.")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise UserError(f"{label}: weight_map must map tensor names to file names (strings); it is "
                        f"{_show(weight_map)}.")
    if not weight_map:
        raise UserError(f"{label}: weight_map is empty (it lists no tensors); {_HINT}.")
    files = []
    for name in sorted(set(weight_map.values())):
        if name == INDEX_FILE:
            raise UserError(f"{label}: weight_map names the index itself as a weight file.")
        if "\x00" in name:
            raise UserError(f"{label}: weight_map names {name!r} as a weight file: a NUL byte is in no file name.")
        if not name.endswith(".safetensors"):
            raise UserError(f"{label}: weight_map names {name!r} as a weight file, which is not a .safetensors file "
                            f"name; {_HINT}.")
        target = _weight_file(folder, name, index)
        problem = _file_problem(target)
        if problem:
            raise UserError(f"{where}: {name} (a weight file {INDEX_FILE} lists) {problem}.")
        files.append((name, target))
    return files


def _load_safetensors(file: Path, label: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (a regular file, checked), or a one-line UserError starting with
    ``label``: its header is checked first (the commonest breakages get a plain explanation), then safetensors
    reads it (anything else it refuses is reported in its words)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise UserError(f"{label}: the file is empty (expected safetensors weights); {_HINT}.")
            # The first 8 bytes are the header's length. Where that length cannot be right, say what the file is.
            length = struct.unpack("<Q", head)[0] if size >= 8 else size
            if length > min(size - 8, _MAX_HEADER_BYTES):
                if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and 2 <= head[1] <= 5):
                    raise UserError(f"{label}: a pickle (torch.save, pytorch_model.bin) file, not safetensors; "
                                    f"bigtrain never unpickles weights (that can run code). Convert it to safetensors "
                                    f"where you trust it, or use the model's safetensors files.")
                if size < 8:
                    raise UserError(f"{label}: {size} bytes, too short for a safetensors header (truncated?); "
                                    f"{_HINT}.")
                limit = (f"but only {size - 8:,} follow" if length > size - 8
                         else f"over safetensors' limit of {_MAX_HEADER_BYTES:,}")
                raise UserError(f"{label}: its header length says {length:,} bytes {limit}: truncated, or not a "
                                f"safetensors file; {_HINT}.")
            _check_header(f.read(length), size - 8 - length, label)
    except OSError as exc:
        raise UserError(f"{label}: cannot be read ({exc.strerror or exc}).") from None
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        text = _first_line(exc)
        text = text if len(text) <= 200 else text[:197] + "..."  # safetensors may list every dtype it knows
        raise UserError(f"{label}: not a readable safetensors file ({text}); {_HINT}.") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_header(header: bytes, data_bytes: int, label: str) -> None:
    """A safetensors header: UTF-8 JSON, an object, whose tensors' data fits in the ``data_bytes`` after it."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: its header is not UTF-8 (byte 0x{header[exc.start]:02x} at offset "
                        f"{8 + exc.start}): not a safetensors file; {_HINT}.") from None
    try:
        content = json.loads(text)
    except RecursionError:
        raise UserError(f"{label}: its header is JSON nested too deeply: not a safetensors file; {_HINT}.") from None
    except ValueError as exc:
        raise UserError(f"{label}: its header is not valid JSON ({_first_line(exc).split(';')[0]}): not a safetensors "
                        f"file; {_HINT}.") from None
    if not isinstance(content, dict):
        raise UserError(f"{label}: its header is {_show(content)}, not a JSON object: not a safetensors file; "
                        f"{_HINT}.")
    ends = [entry["data_offsets"][1] for name, entry in content.items()
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and _is_int(entry["data_offsets"][1])]
    end = max(ends, default=0)
    if end > data_bytes:
        raise UserError(f"{label}: its header describes {end:,} bytes of tensor data but the file holds "
                        f"{data_bytes:,}: truncated (download or copy it again), or a broken header.")


def read_safetensors_dir(path: Path, where: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (``model.safetensors`` or an index with shards), read only from files in it."""
    return _read_weights(path, where or str(path))[0]


def _read_weights(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of an HF folder, and the file each came from (its name in the folder); every failure a one-line
    UserError naming the file, starting with ``where``."""
    if os.path.lexists(path / INDEX_FILE):  # an index that is there but broken is an error, never skipped
        problem = _file_problem(path / INDEX_FILE)
        if problem:
            raise UserError(f"{where}: {INDEX_FILE} {problem}; {_HINT}.")
        files = _index_files(path, where)
    elif os.path.lexists(path / SAFETENSORS_FILE):
        files = [(SAFETENSORS_FILE, _weight_file(path, SAFETENSORS_FILE, path))]
        problem = _file_problem(files[0][1])
        if problem:
            raise UserError(f"{where}: {SAFETENSORS_FILE} {problem}; {_HINT}.")
    else:
        raise UserError(f"{path}: no {SAFETENSORS_FILE} or {INDEX_FILE}; model.init_from needs a Hugging Face folder "
                        f"with safetensors weights (e.g. written by `bigtrain export CKPT --to hf OUT`).")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name, file in files:
        for key, tensor in _load_safetensors(file, f"{where}: {name}").items():
            if key in tensors:
                raise UserError(f"{where}: {name}: tensor {key!r} is also in {sources[key]} (it is in both); "
                                f"a folder holds each tensor once.")
            tensors[key], sources[key] = tensor, name
    return tensors, sources


# ---------------------------------------------------------------------------- import (model.init_from)
_LAYER = r"model\.layers\.(\d+)\."
_MOE_ROUTER = re.compile(_LAYER + r"(block_sparse_moe|mlp)\.gate\.weight")
_MOE_EXPERT = re.compile(_LAYER + r"(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
_MOE_FUSED = re.compile(_LAYER + r"mlp\.experts\.(gate_up_proj|down_proj)")


def load_hf_weights(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """bigtrain-named fp32 weights from an HF Llama, Qwen3, Mixtral or Qwen3-MoE folder, after checking its
    shape equals ``cfg``.

    The folder is untrusted input: whatever is wrong with it (a config.json that is not a JSON object of the
    right types, an index without a usable weight_map, a weight file that is missing, not safetensors, or
    truncated, a tensor of the wrong dtype or shape) is a one-line UserError naming the file, raised before the
    model is touched."""
    from bigtrain.model.decoder import build_on_meta

    folder = Path(path).expanduser()
    where = f"model.init_from={str(path)!r}"
    config_file = folder / "config.json"
    if not os.path.lexists(config_file):
        raise UserError(f"{where}: no config.json there; give a Hugging Face Llama-format folder "
                        f"(e.g. written by `bigtrain export CKPT --to hf OUT`).")
    problem = _file_problem(config_file)
    if problem:
        raise UserError(f"{where}: config.json {problem}; {_HINT}.")
    hf_cfg = _read_json(config_file, f"{where}: config.json")
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{where}: config.json is {_show(hf_cfg)}, not a JSON object; {_HINT}.")
    theirs = model_fields_from_hf(hf_cfg, f"{where}: config.json")
    diff = _shape_diff(_ours(cfg), theirs)
    if diff:
        raise UserError(f"{where}: the weights do not fit this model:\n  " + "\n  ".join(diff) +
                        "\nSet those model.* keys to the weights' values.")
    layout = _MOE_LAYOUTS.get(hf_cfg.get("model_type") or "llama")
    hf, sources = _read_weights(folder, where)
    weights: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}  # stacked bigtrain name -> expert index -> weight
    origins: dict[str, tuple[str, torch.Size]] = {}  # bigtrain name (an expert: "name[j]") -> (file: tensor, shape)
    for name, tensor in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived, not a weight
        src = f"{where}: {sources[name]}: tensor {name!r}"
        if not tensor.is_floating_point():
            raise UserError(f"{src} has dtype {str(tensor.dtype).removeprefix('torch.')}; model weights are floating "
                            f"point (float32, bfloat16, float16, ...).")
        if layout is not None and _read_moe_tensor(name, tensor.float(), layout, weights, experts, origins, src):
            continue
        try:
            ours = from_hf_name(name)
        except KeyError:
            raise UserError(f"{where}: {sources[name]}: unexpected tensor {name!r} (not part of a Llama, Qwen3, "
                            f"Mixtral or Qwen3-MoE decoder).") from None
        weights[ours], origins[ours] = tensor.float(), (src, tensor.shape)
    expected = {k: v.shape for k, v in build_on_meta(cfg).state_dict().items() if not k.startswith("rope_")}
    for stacked, per_expert in experts.items():
        assert cfg.moe is not None  # the shapes agreed: the folder is MoE, so is cfg
        if sorted(per_expert) != list(range(cfg.moe.num_experts)):
            missing = sorted(set(range(cfg.moe.num_experts)) - set(per_expert))
            raise UserError(f"{where}: {stacked} (per-expert tensors): experts {missing[:5]} are missing, or an index "
                            f"is beyond num_experts={cfg.moe.num_experts}.")
        want = expected[stacked][1:] if stacked in expected else per_expert[0].shape  # not in it: init_from_hf says
        for j in range(cfg.moe.num_experts):
            _check_shape(f"{stacked}[{j}]", per_expert[j], want, origins)
        weights[stacked] = torch.stack([per_expert[j] for j in range(cfg.moe.num_experts)])
        origins[stacked] = origins[f"{stacked}[0]"]
    for ours, tensor in weights.items():
        if ours in expected:  # a tensor the model does not have: init_from_hf names it
            _check_shape(ours, tensor, expected[ours], origins)
    if cfg.moe is not None and cfg.moe.load_balance == "bias":
        # The HF routers select on the plain scores: a zero bias is exactly that (and training moves it from there).
        for i in range(cfg.moe.first_dense_layers, cfg.num_layers):
            weights[f"layers.{i}.ffn.router.expert_bias"] = torch.zeros(cfg.moe.num_experts)
    if cfg.tie_embeddings:
        weights.pop("output.weight", None)
    elif "output.weight" not in weights:
        raise UserError(f"{where}: untied model (model.tie_embeddings=false) but the weights have no lm_head.weight.")
    return weights


def _check_shape(ours: str, tensor: torch.Tensor, want: torch.Size,
                 origins: dict[str, tuple[str, torch.Size]]) -> None:
    """A one-line UserError naming the file and tensor when ``tensor`` (bigtrain's ``ours``) is not ``want``."""
    if tensor.shape == want:
        return
    src, shape = origins[ours]
    split = "" if shape == tensor.shape else f", which gives {ours} the shape {list(tensor.shape)},"
    raise UserError(f"{src} has shape {list(shape)}{split} but its config.json's model needs {list(want)} there "
                    f"(bigtrain's {ours}): the weights do not match their own config.json.")


def _read_moe_tensor(name: str, tensor: torch.Tensor, layout: _MoELayout, weights: dict[str, torch.Tensor],
                     experts: dict[str, dict[int, torch.Tensor]], origins: dict[str, tuple[str, torch.Size]],
                     src: str) -> bool:
    """Take one sparse-block tensor of a Mixtral / Qwen3-MoE folder (hub layout, or transformers 5's fused
    one, whose Mixtral block is ``mlp``); False when ``name`` is not one. ``src`` names its file and tensor
    (``origins``: for a shape error later)."""
    if m := _MOE_ROUTER.fullmatch(name):
        ours = f"layers.{m[1]}.ffn.router.gate.weight"
        weights[ours], origins[ours] = tensor, (src, tensor.shape)
        return True
    if (m := _MOE_EXPERT.fullmatch(name)) and m[2] == layout.block and m[4] in layout.experts:
        stacked = f"layers.{m[1]}.ffn.experts.{_EXPERT_PARAMS[layout.experts.index(m[4])]}"
        experts.setdefault(stacked, {})[int(m[3])] = tensor
        origins[f"{stacked}[{int(m[3])}]"] = (src, tensor.shape)
        return True
    if m := _MOE_FUSED.fullmatch(name):
        prefix = f"layers.{m[1]}.ffn.experts"
        if m[2] == "down_proj":
            weights[f"{prefix}.w2"], origins[f"{prefix}.w2"] = tensor, (src, tensor.shape)
            return True
        if tensor.dim() != 3 or tensor.shape[1] % 2:
            raise UserError(f"{src} has shape {list(tensor.shape)}; the fused layout is [experts, 2 x expert hidden "
                            f"size, hidden size] (gate and up projections).")
        gate, up = tensor.chunk(2, dim=1)  # gate and up concatenated along the output rows, gate first
        weights[f"{prefix}.w1"], weights[f"{prefix}.w3"] = gate.contiguous(), up.contiguous()
        origins[f"{prefix}.w1"] = origins[f"{prefix}.w3"] = (src, tensor.shape)
        return True
    return False


def init_from_hf(path: str | Path, cfg: ModelConfig, strategy: Strategy, model: nn.Module) -> None:
    """Overwrite a freshly initialized (possibly sharded) model with HF weights, through the strategy."""
    weights = load_hf_weights(path, cfg)
    expected = {k for k in strategy.unwrap(model).state_dict() if not k.startswith("rope_")}
    expected = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") for k in expected}
    missing = sorted(expected - set(weights))
    if missing:
        raise UserError(f"model.init_from={str(path)!r}: missing tensors {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}.")
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise UserError(f"model.init_from={str(path)!r}: tensors this model does not have: "
                        f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}.")
    strategy.load_model_weights(model, weights)
    messages.say(f"initialized weights from {os.fspath(path)} ({len(weights)} tensors)")
