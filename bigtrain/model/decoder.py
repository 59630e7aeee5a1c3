"""A pure decoder-only Transformer: no sharding, compile or DeepSpeed code lives here.

Build it on the meta device, let a Strategy shard/wrap it, then materialize with
``to_empty`` and call :meth:`Decoder.init_weights` — so no rank ever holds a full large model.
The elementwise ops and the loss go through :mod:`bigtrain.kernels`, which picks the plain
PyTorch reference or a fused Triton kernel from ``model.kernels``.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.kernels import dispatch as K
from bigtrain.kernels.attention import attention, positions_from_doc_ids
from bigtrain.kernels.reference import apply_rotary  # noqa: F401  (re-exported: the reference rotary)
from bigtrain.model.config import ModelConfig
from bigtrain.model.init import Filler, seeded_filler
from bigtrain.model.moe import MoE, MoEStats, is_moe_layer


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float, kernels: str = "torch") -> None:
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps, self.kernels)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_seq_len, head_dim // 2] (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    """Causal grouped-query self-attention through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.kernels = cfg.kernels
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        # QK-norm (Qwen3's q_norm/k_norm): one head_dim gain shared by all heads, so tensor parallelism
        # replicates it whole however the heads are split.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.kernels) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin: the full rotary tables; positions [B, S] (None = 0..S-1); doc_ids [B, S] masks across documents."""
        bsz, seq, _ = x.shape
        # Head counts are inferred (-1): under tensor parallelism a rank holds only its share of the heads.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            # Before rotary, on the contiguous [B, S, heads, head_dim] layout (rows of head_dim), as Qwen3 does.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q, k = K.rotary(q, k, cos, sin, positions, self.kernels)
        out = self.attend(q, k, v, doc_ids)
        y: torch.Tensor = self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))
        return y

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               doc_ids: torch.Tensor | None) -> torch.Tensor:
        """Attention over [B, heads, S, head_dim] (rotary applied); context parallelism overrides this."""
        if k.shape[1] != q.shape[1]:
            # Explicit repeat instead of sdpa's enable_gqa: every sdpa backend accepts it.
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return attention(q, k, v, doc_ids)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.w2(K.swiglu(self.w1(x), self.w3(x), self.kernels))
        return y


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a
    Mixture-of-Experts layer in the blocks ``model.moe`` makes sparse."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.ffn: FeedForward | MoE = MoE(cfg) if is_moe_layer(cfg, index) else FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, doc_ids)
        y: torch.Tensor = x + self.ffn(self.ffn_norm(x))
        return y


class Decoder(nn.Module):
    """Token embedding → blocks → final norm → vocabulary projection (optionally tied)."""

    # Buffers registered in __init__ (declared for the type checker).
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0".."L-1" keeps parameter names stable when blocks are wrapped.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, recomputed by init_weights after materialization.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # MoE routing statistics of training forwards, read on log steps (model/moe.py); None when dense.
        self.moe_stats: MoEStats | None = MoEStats() if cfg.moe is not None else None

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, fill: Filler | None = None) -> None:
        """(Re)initialize every parameter and buffer in place; works after ``to_empty``.

        ``fill(param, std, name)`` draws normal weights; the default fills whole tensors from
        per-(seed, name, block) generators, so a sharding-aware filler reproduces the same weights.
        """
        fill = fill or seeded_filler(seed)
        for name, param, std in self.init_plan():
            if std is None:
                nn.init.ones_(param)
            else:
                fill(param, std, name)
        self.init_buffers()

    def init_plan(self) -> list[tuple[str, torch.Tensor, float | None]]:
        """How each parameter is initialized: (canonical name, parameter, normal std; None = ones, the norms).

        One entry per parameter, so a backend that holds parameters in pieces (ZeRO-3) can
        initialize them one at a time.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.num_layers)
        plan: list[tuple[str, torch.Tensor, float | None]] = []
        # A pipeline stage holds some of the blocks and maybe no embedding / final norm / output (None).
        if self.tok_embeddings is not None:
            plan.append(("tok_embeddings.weight", self.tok_embeddings.weight, std))
        for i, module in self.layers.items():
            block = cast(Block, module)  # a Block (wrappers swap its class in place)
            for lin in ("wq", "wk", "wv"):
                plan.append((f"layers.{i}.attn.{lin}.weight", getattr(block.attn, lin).weight, std))
            plan.append((f"layers.{i}.attn.wo.weight", block.attn.wo.weight, residual_std))
            plan.extend(self._ffn_init_plan(f"layers.{i}.ffn", block.ffn, std, residual_std))
            plan.append((f"layers.{i}.attn_norm.weight", block.attn_norm.weight, None))
            plan.append((f"layers.{i}.ffn_norm.weight", block.ffn_norm.weight, None))
            for qk in ("q_norm", "k_norm"):  # ones, no random draw: the other weights stay as without QK-norm
                norm = getattr(block.attn, qk)
                if norm is not None:
                    plan.append((f"layers.{i}.attn.{qk}.weight", norm.weight, None))
        if self.norm is not None:
            plan.append(("norm.weight", self.norm.weight, None))
        if self.output is not None:
            plan.append(("output.weight", self.output.weight, std))
        return plan

    @staticmethod
    def _ffn_init_plan(prefix: str, ffn: FeedForward | MoE, std: float,
                       residual_std: float) -> list[tuple[str, torch.Tensor, float | None]]:
        """Dense SwiGLU or MoE: inputs (w1, w3, router) at ``std``, outputs (w2) at ``residual_std``."""
        if not isinstance(ffn, MoE):
            return [(f"{prefix}.w1.weight", ffn.w1.weight, std), (f"{prefix}.w3.weight", ffn.w3.weight, std),
                    (f"{prefix}.w2.weight", ffn.w2.weight, residual_std)]
        plan: list[tuple[str, torch.Tensor, float | None]] = [
            (f"{prefix}.router.gate.weight", ffn.router.gate.weight, std),
            (f"{prefix}.experts.w1", ffn.experts.w1, std), (f"{prefix}.experts.w3", ffn.experts.w3, std),
            (f"{prefix}.experts.w2", ffn.experts.w2, residual_std)]
        if ffn.shared is not None:
            plan += [(f"{prefix}.shared.w1.weight", ffn.shared.w1.weight, std),
                     (f"{prefix}.shared.w3.weight", ffn.shared.w3.weight, std),
                     (f"{prefix}.shared.w2.weight", ffn.shared.w2.weight, residual_std)]
        return plan

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the rotary tables (not persistent: derived from the config); zero the MoE routing biases."""
        cos, sin = rotary_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, MoE) and module.router.expert_bias is not None:
                module.router.expert_bias.zero_()

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] when ``targets`` is None, else the mean next-token loss (fp32;
        in training mode plus the MoE auxiliary terms, which are also recorded in ``moe_stats``).

        Targets equal to -100 are ignored. ``doc_ids`` [batch, seq] (packed documents) keeps attention
        inside each document and restarts rotary positions at each document start, unless
        ``positions`` [batch, seq] gives them explicitly. Without either: plain causal attention.
        """
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if positions is None and doc_ids is not None:
            positions = positions_from_doc_ids(doc_ids)
        cos, sin = self.rope_cos, self.rope_sin
        h = self.tok_embeddings(tokens)
        aux: torch.Tensor | None = None
        for name, block in self.layers.items():
            h = block(h, cos, sin, positions, doc_ids)
            ffn = cast(Block, block).ffn
            if isinstance(ffn, MoE) and targets is not None and self.training:
                # Read right after the block ran (activation checkpointing recomputes it later, in backward).
                assert ffn.aux_loss is not None and ffn.last_stats is not None and self.moe_stats is not None
                aux = ffn.aux_loss if aux is None else aux + ffn.aux_loss
                self.moe_stats.add(f"layers.{name}", ffn.last_stats)
        loss = self.output_head(self.norm(h), targets)
        return loss if aux is None else loss + aux

    def output_head(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states [B, S, dim] -> logits, or the mean loss against ``targets``
        (tensor parallelism overrides this with a loss on vocabulary-sharded logits)."""
        if targets is None:
            return F.linear(h, self.output_weight())
        return K.linear_cross_entropy(h.flatten(0, 1), self.output_weight(), targets.flatten(),
                                      z_loss=self.cfg.z_loss, kernels=self.cfg.kernels)


def build_on_meta(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Decoder:
    """Construct the model without allocating parameter memory; its weights in ``dtype`` (fp32 master
    weights, or fp64 for train.precision=fp64)."""
    with torch.device("meta"):
        model = Decoder(cfg)
    if dtype != torch.float32:
        model.to(dtype)
    return model


def materialize(model: Decoder, device: torch.device | str, seed: int | None = None) -> Decoder:
    """Allocate a meta-built model on ``device`` and initialize it."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
