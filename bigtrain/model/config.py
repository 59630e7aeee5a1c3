"""Model configuration (the ``model`` section), named sizes, parameter and FLOP counts."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from bigtrain.sections import ConfigError, Section, doc_field

# Named sizes. A config selects one with ``model.preset`` and may override any field.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.4M parameters, QK-norm: the `make train` demo, tuned to learn as much as it can in ~3 minutes
    # of a 2-core CPU (bench/results/demo-tuning-cpu-2core.md).
    "debug": {"vocab_size": 4096, "dim": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
              "ffn_hidden_dim": 0, "max_seq_len": 256, "tie_embeddings": True, "rope_theta": 10000.0,
              "qk_norm": True},
    # GPT-2 small shape with Llama-style blocks; SwiGLU hidden = 8/3 dim keeps the parameter count.
    "gpt2-124m": {"vocab_size": 50304, "dim": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 12,
                  "ffn_hidden_dim": 2048, "max_seq_len": 1024, "tie_embeddings": True, "rope_theta": 10000.0},
    # GPT-2 XL shape (1.5B; 25 heads of 64), Llama-style blocks; SwiGLU 4288 ~ the 4x GELU MLP's parameters.
    "gpt2-1.5b": {"vocab_size": 50304, "dim": 1600, "num_layers": 48, "num_heads": 25, "num_kv_heads": 25,
                  "ffn_hidden_dim": 4288, "max_seq_len": 1024, "tie_embeddings": True, "rope_theta": 10000.0},
    "gpt2-350m": {"vocab_size": 50304, "dim": 1024, "num_layers": 24, "num_heads": 16, "num_kv_heads": 16,
                  "ffn_hidden_dim": 2816, "max_seq_len": 1024, "tie_embeddings": True, "rope_theta": 10000.0},
    # Llama 3.2 1B shape.
    "llama-1b": {"vocab_size": 128256, "dim": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,
                 "ffn_hidden_dim": 8192, "max_seq_len": 2048, "tie_embeddings": True, "rope_theta": 500000.0},
    "llama3-8b": {"vocab_size": 128256, "dim": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
                  "ffn_hidden_dim": 14336, "max_seq_len": 8192, "tie_embeddings": False, "rope_theta": 500000.0},
    "llama3-70b": {"vocab_size": 128256, "dim": 8192, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8,
                   "ffn_hidden_dim": 28672, "max_seq_len": 8192, "tie_embeddings": False, "rope_theta": 500000.0},
    "llama3-405b": {"vocab_size": 128256, "dim": 16384, "num_layers": 126, "num_heads": 128, "num_kv_heads": 8,
                    "ffn_hidden_dim": 53248, "max_seq_len": 8192, "tie_embeddings": False, "rope_theta": 500000.0},
    # Mixture-of-Experts. moe-debug: the debug model with 8 experts, top-2, each half the dense SwiGLU
    # (2 x 192 = the dense 384), so its active parameters equal debug's (+ the router); trains on CPU.
    "moe-debug": {"vocab_size": 4096, "dim": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                  "ffn_hidden_dim": 0, "max_seq_len": 256, "tie_embeddings": True, "rope_theta": 10000.0,
                  "qk_norm": True, "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_dim": 192}},
    # OLMoE-1B-7B's shape: 64 experts, top-8, no renormalization, auxiliary + router z-loss, QK-norm.
    "olmoe-1b-7b": {"vocab_size": 50304, "dim": 2048, "num_layers": 16, "num_heads": 16, "num_kv_heads": 16,
                    "ffn_hidden_dim": 1024, "max_seq_len": 4096, "tie_embeddings": False, "rope_theta": 10000.0,
                    "qk_norm": True,
                    "moe": {"num_experts": 64, "top_k": 8, "expert_hidden_dim": 1024, "normalize_topk": False,
                            "aux_loss_weight": 0.01, "router_z_loss": 0.001}},
    # Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8, 4 KV heads, head dim 128): bigtrain's head dim
    # is dim / num_heads, so 16 query heads of 128 stand for Qwen3's 32 (attention is ~4% of its FLOPs).
    "qwen3-30b-a3b": {"vocab_size": 151936, "dim": 2048, "num_layers": 48, "num_heads": 16, "num_kv_heads": 4,
                      "ffn_hidden_dim": 6144, "max_seq_len": 4096, "tie_embeddings": False, "rope_theta": 1000000.0,
                      "qk_norm": True,
                      "moe": {"num_experts": 128, "top_k": 8, "expert_hidden_dim": 768, "aux_loss_weight": 0.001}},
}


# Resume compares the saved model section with the new one. Keys (paths under `model.`) that only name where a
# model came from: a resume ignores them.
PROVENANCE_FIELDS = frozenset({"preset", "init_from"})
# Training settings of the model section: how it is computed or what its loss adds, not what its weights mean.
# A resume may change them and reports the change; any other model key is architecture, and a change is refused.
TRAINING_FIELDS = frozenset({"kernels", "fp8", "z_loss", "moe.router_z_loss", "moe.aux_loss_weight",
                             "moe.bias_update_rate"})


@dataclass(frozen=True)
class MoEConfig(Section):
    """Mixture-of-Experts feed-forward blocks (absent section = dense model). See docs/moe.md."""

    num_experts: int = doc_field(8, "Routed experts per MoE layer.", gt=0)
    top_k: int = doc_field(2, "Experts each token is sent to (token-choice, dropless).", gt=0)
    expert_hidden_dim: int = doc_field(0, "SwiGLU hidden size of one expert; 0 = the dense model's ffn hidden size.",
                                       ge=0)
    num_shared_experts: int = doc_field(0, "Always-on shared experts (DeepSeek style), one SwiGLU of "
                                           "num_shared_experts * expert_hidden_dim; 0 = none.", ge=0)
    first_dense_layers: int = doc_field(0, "Leading blocks that keep a dense SwiGLU feed-forward.", ge=0)
    router: Literal["softmax", "sigmoid"] = doc_field("softmax", "Router scores: softmax over experts (Mixtral, "
                                                                  "Qwen3-MoE) or per-expert sigmoid (DeepSeek-V3).")
    normalize_topk: bool = doc_field(True, "Renormalize the chosen top-k weights to sum to 1.")
    load_balance: Literal["aux_loss", "bias", "none"] = doc_field(
        "aux_loss", "aux_loss: auxiliary balancing loss (aux_loss_weight); bias: DeepSeek-V3's auxiliary-loss-free "
                    "per-expert selection bias (bias_update_rate); none.")
    aux_loss_weight: float = doc_field(0.01, "Weight of the auxiliary balancing loss (load_balance: aux_loss).", ge=0)
    bias_update_rate: float = doc_field(1e-3, "Per-step bias change toward balance (load_balance: bias).", ge=0)
    router_z_loss: float = doc_field(0.0, "Weight of the router z-loss (mean squared log-sum-exp of the router "
                                          "logits); 0 = off, 1e-3 is typical.", ge=0)
    expert_matmul: Literal["auto", "grouped", "loop"] = doc_field(
        "auto", "How experts multiply their tokens: grouped (torch._grouped_mm, one call, no host sync), loop (one "
                "matmul per expert) or auto (grouped where the installed torch has it and sizes allow).")

    def validate(self, path: str) -> None:
        if self.top_k > self.num_experts:
            raise ConfigError(f"{path}.top_k: {self.top_k} exceeds {path}.num_experts={self.num_experts}; "
                              f"choose top_k <= num_experts.")
        if self.router == "softmax" and self.top_k == 1 and self.normalize_topk:
            raise ConfigError(f"{path}.normalize_topk: with router softmax and top_k 1 the renormalized weight is "
                              f"always 1 and the router gets no gradient; set {path}.normalize_topk=false.")



@dataclass(frozen=True)
class ModelConfig(Section):
    """Decoder-only Transformer shape (pre-norm, RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    preset: str | None = doc_field(None, "Named size to start from (debug, gpt2-124m, gpt2-350m, gpt2-1.5b, llama-1b, "
                                         "llama3-8b, llama3-70b, llama3-405b; MoE: moe-debug, olmoe-1b-7b, "
                                         "qwen3-30b-a3b); other keys override it.")
    vocab_size: int = doc_field(4096, "Embedding rows; must be >= the tokenizer's vocabulary (round up to a multiple "
                                      "of 64 for speed).")
    dim: int = doc_field(256, "Hidden size of the residual stream.")
    num_layers: int = doc_field(4, "Number of Transformer blocks.")
    num_heads: int = doc_field(4, "Attention query heads; dim must be divisible by it.")
    num_kv_heads: int | None = doc_field(None, "Key/value heads for grouped-query attention (null = num_heads); must "
                                               "divide num_heads.")
    ffn_hidden_dim: int = doc_field(0, "SwiGLU hidden size; 0 = 8/3 * dim rounded up to ffn_multiple_of.")
    ffn_multiple_of: int = doc_field(64, "Rounding for the automatic SwiGLU hidden size.")
    max_seq_len: int = doc_field(256, "Longest sequence the rotary tables are built for; data.seq_len must "
                                      "not exceed it.")
    rope_theta: float = doc_field(10000.0, "Rotary embedding base frequency.")
    norm_eps: float = doc_field(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = doc_field(True, "Share the input embedding and output projection weights.")
    qk_norm: bool = doc_field(False, "RMSNorm over each head's queries and keys before rotary (as Qwen3 and "
                                     "OLMo-2): one weight of size head_dim each for q and k per layer, shared by "
                                     "the heads. Steadier training at high learning rates; such a model exports "
                                     "to Hugging Face Qwen3ForCausalLM.")
    init_std: float = doc_field(0.02, "Std of the normal init; residual output projections are scaled by "
                                      "1/sqrt(2 * num_layers).")
    init_from: str = doc_field("", "Start from these weights instead of a random init: a Hugging Face Llama-format "
                                   "folder (Qwen3 with qk_norm; Mixtral or Qwen3-MoE with moe; config.json + "
                                   "*.safetensors), e.g. from "
                                   "`bigtrain export`; its shape must match this section. Ignored when resuming.")
    z_loss: float = doc_field(0.0, "Weight of the z-loss (mean squared log-sum-exp of the logits) added to the "
                                   "training loss; 0 = off, 1e-4 is typical.")
    kernels: Literal["torch", "triton"] = doc_field("torch", "Norm, rotary, SwiGLU and loss ops: torch (plain PyTorch) "
                                                             "or triton (fused kernels, CUDA only; other devices fall "
                                                             "back to torch, logged). See docs/performance.md.")
    fp8: bool = doc_field(False, "Train the Transformer blocks' linear layers in FP8 through torchao float8 "
                                 "(H100-class GPUs; emulated elsewhere, for tests only). Needs the fp8 extra.")
    moe: MoEConfig | None = doc_field(None, "Mixture-of-Experts feed-forward blocks (see docs/moe.md); absent or "
                                            "null = a dense model.")

    @classmethod
    def preprocess(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        preset = data.get("preset")
        if preset is None:
            return data
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{path}.preset: unknown model preset {preset!r}.{hint} Known presets: {', '.join(PRESETS)}."
            )
        merged = {**PRESETS[preset], **data}
        base_moe, given_moe = PRESETS[preset].get("moe"), data.get("moe")
        if isinstance(base_moe, dict) and isinstance(given_moe, dict):
            merged["moe"] = {**base_moe, **given_moe}  # model.moe.top_k=4 changes one key of the preset's moe
        return merged

    def validate(self, path: str) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "ffn_multiple_of"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be positive, got {getattr(self, name)}.")
        if self.dim % self.num_heads:
            suggestion = self.num_heads * max(1, round(self.dim / self.num_heads))
            raise ConfigError(
                f"{path}.dim: {self.dim} is not divisible by {path}.num_heads={self.num_heads}; "
                f"choose dim as a multiple of num_heads (e.g. {suggestion})."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"{path}.dim: head dim {self.head_dim} (dim / num_heads) must be even for rotary embeddings."
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_heads % kv:
            divisors = ", ".join(str(d) for d in range(1, self.num_heads + 1) if self.num_heads % d == 0)
            raise ConfigError(
                f"{path}.num_kv_heads: {self.num_kv_heads} does not divide {path}.num_heads={self.num_heads}; "
                f"use a divisor of num_heads (e.g. {divisors})."
            )
        if self.ffn_hidden_dim < 0:
            raise ConfigError(f"{path}.ffn_hidden_dim: must be >= 0 (0 = automatic), got {self.ffn_hidden_dim}.")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{path}: norm_eps, init_std and rope_theta must be positive.")
        if self.z_loss < 0:
            raise ConfigError(f"{path}.z_loss: must be >= 0 (0 = off), got {self.z_loss}.")
        if self.moe is not None and self.moe.first_dense_layers >= self.num_layers:
            raise ConfigError(f"{path}.moe.first_dense_layers: {self.moe.first_dense_layers} leaves no MoE layer in "
                              f"{self.num_layers} layers; use at most {self.num_layers - 1} or drop the moe section.")
        if self.fp8:
            # torch._scaled_mm needs both matmul dims divisible by 16.
            bad = [f"{name}={value}" for name, value in (("dim", self.dim), ("ffn_dim", self.ffn_dim),
                                                          ("kv_heads * head_dim", self.kv_heads * self.head_dim))
                   if value % 16]
            if bad:
                raise ConfigError(f"{path}.fp8: FP8 matmuls need layer sizes divisible by 16, got {', '.join(bad)}; "
                                  f"round them to multiples of 16 or set {path}.fp8=false.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(8 * self.dim / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)


def count_parameters(cfg: ModelConfig, *, include_embedding: bool = True, active: bool = False) -> int:
    """Number of trainable parameters, counting a tied embedding once. ``active=True`` counts what one
    token uses: in MoE layers the router, ``top_k`` routed experts and the shared experts."""
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.num_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.num_heads * hd * d
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)  # block norms (+ the q and k norms, one head_dim each)
    dense_block = attn + 3 * d * cfg.ffn_dim + norms
    total = d  # the final norm
    for layer in range(cfg.num_layers):
        if cfg.moe is None or layer < cfg.moe.first_dense_layers:
            total += dense_block
            continue
        moe = cfg.moe
        expert = 3 * d * (moe.expert_hidden_dim or cfg.ffn_dim)
        routed = moe.top_k if active else moe.num_experts
        total += attn + norms + d * moe.num_experts + expert * (routed + moe.num_shared_experts)
    if include_embedding:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    elif not cfg.tie_embeddings:
        total += cfg.vocab_size * d  # the output projection is a real matmul
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N (forward + backward matmuls) + 12·L·H·Q·T (attention scores).

    N counts a tied embedding once (the PaLM / nanoGPT convention used for MFU); for a MoE model it
    is the *active* parameters (router, top_k routed and the shared experts), what a token computes.
    """
    n = count_parameters(cfg, active=True)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
