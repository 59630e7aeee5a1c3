"""Plain-PyTorch references for every fused op (the ``model.kernels: torch`` path).

These are the decoder's original formulas, moved here unchanged so ``kernels: torch`` keeps its
numerics bit for bit. Each computes in fp32 whatever the input dtype, except that fp64 inputs stay
in fp64: the kernel tests use them as the exact reference. This module imports torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for ``x``: fp64 stays fp64, everything else computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.to(acc_dtype(x))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.to(xf.dtype)).type_as(x)


def gather_rotary(cos: torch.Tensor, sin: torch.Tensor, seq: int,
                  positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows for each token: [seq, half] for plain positions, [batch, 1, seq, half] for ``positions``."""
    if positions is None:
        return cos[:seq], sin[:seq]
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :half], x[..., half:]) — the "rotate half" (Llama-HF) layout.

    x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim // 2] or [batch, 1, seq, head_dim // 2].
    """
    half = x.shape[-1] // 2
    dt = acc_dtype(x)
    x1, x2 = x[..., :half].to(dt), x[..., half:].to(dt)
    cos, sin = cos.to(dt), sin.to(dt)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, S, D] and k [B, Hk, S, D]; cos/sin are the full [max_seq, D/2] tables.

    ``positions`` [B, S] (int) gives each token's position (documents restart at 0); None = 0..S-1.
    """
    c, s = gather_rotary(cos, sin, q.shape[2], positions)
    return apply_rotary(q, c, s), apply_rotary(k, c, s)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype (the decoder's original expression)."""
    return F.silu(gate) * up


def swiglu_exact(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    dt = acc_dtype(gate)
    return (F.silu(gate.to(dt)) * up.to(dt)).type_as(gate)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                  z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over non-ignored targets (+ z_loss * mean(logsumexp^2)), in fp32 (fp64 for fp64).

    logits: [tokens, vocab]; targets: [tokens].
    """
    lf = logits.to(acc_dtype(logits))
    loss = F.cross_entropy(lf, targets, ignore_index=ignore_index)
    if z_loss:
        valid = targets != ignore_index
        lse = torch.logsumexp(lf, dim=-1)
        # Divide by the valid count on device (no host sync); clamp keeps an all-ignored batch at 0, not NaN.
        loss = loss + z_loss * (lse.pow(2) * valid).sum() / valid.sum().clamp(min=1)
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0) -> torch.Tensor:
    """The naive path: full [tokens, vocab] logits, then :func:`cross_entropy`. hidden: [tokens, dim]."""
    return cross_entropy(F.linear(hidden, weight), targets, ignore_index=ignore_index, z_loss=z_loss)
