"""Rotary embedding of q and k in one Triton kernel (forward and backward) and its autograd Function.

One program handles one token: it rotates all query heads and all key heads of that token with
the same cos/sin row, so the table row is read once. The backward is the inverse rotation (the
same kernel with sin negated). Strides are passed explicitly, so the transposed [B, H, S, D]
views the attention layer produces need no copy. Reference:
:func:`bigtrain.kernels.reference.rotary`.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from bigtrain.kernels.reference import rotary as reference  # noqa: F401  (the op's reference)
from bigtrain.kernels.triton_utils import launch_device


@triton.jit
def _rotate_heads(  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    X, Y, base_x, base_y, stride_xh, stride_yh, H, half, cos, sin, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < half)
    px = X + base_x + heads * stride_xh + cols
    py = Y + base_y + heads * stride_yh + cols
    x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(px + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(py, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(py + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    Q, K, QO, KO, COS, SIN, POS, S, Hq, Hk, half, sign,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s, stride_pos_b,
    HAS_POS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    b = token // S
    s = token % S
    if HAS_POS:  # noqa: SIM108  (a compile-time branch of a Triton kernel; kept in the form tested on GPU)
        pos = tl.load(POS + b * stride_pos_b + s)
    else:
        pos = s
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < half
    cos = tl.load(COS + pos * half + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + pos * half + cols, mask=cmask, other=0.0).to(tl.float32) * sign
    _rotate_heads(Q, QO, b * sq_b + s * sq_s, b * sqo_b + s * sqo_s, sq_h, sqo_h, Hq, half, cos, sin,
                  BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, b * sk_b + s * sk_s, b * sko_b + s * sko_s, sk_h, sko_h, Hk, half, cos, sin,
                  BLOCK_HK, BLOCK_HALF)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor | None, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, hq, seq, dim = q.shape
    hk = k.shape[1]
    half = dim // 2
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "rotary kernel needs unit stride in head_dim"
    # Outputs in the token-major layout the attention projection produced ([B, S, H, D] memory).
    qo = torch.empty((bsz, seq, hq, dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty((bsz, seq, hk, dim), dtype=k.dtype, device=k.device).transpose(1, 2)
    pos = positions if positions is not None else cos  # any tensor: unused when HAS_POS is False
    with launch_device(q):
        _rotary_kernel[(bsz * seq,)](
            q, k, qo, ko, cos, sin, pos, seq, hq, hk, half, sign,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            positions.stride(0) if positions is not None else 0,
            HAS_POS=positions is not None, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_HALF=triton.next_power_of_2(half))
    return qo, ko


class RotaryFunction(torch.autograd.Function):
    """(q, k) rotated by the angle table rows at each token's position."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.contiguous(), sin.contiguous()
        if positions is not None:
            positions = positions.contiguous()
        ctx.save_for_backward(cos, sin, positions)
        ctx.has_pos = positions is not None
        return _launch(q, k, cos, sin, positions, 1.0)

    @staticmethod
    def backward(
        ctx: Any, dq: torch.Tensor, dk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        cos, sin, positions = ctx.saved_tensors
        if dq.stride(-1) != 1:
            dq = dq.contiguous()
        if dk.stride(-1) != 1:
            dk = dk.contiguous()
        # The rotation is orthogonal: its gradient is the rotation by the opposite angle.
        gq, gk = _launch(dq, dk, cos, sin, positions if ctx.has_pos else None, -1.0)
        return gq, gk, None, None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] with the full cos/sin tables [max_seq, D/2] (fp32)."""
    qo: torch.Tensor
    ko: torch.Tensor
    qo, ko = RotaryFunction.apply(q, k, cos, sin, positions)
    return qo, ko
