"""SwiGLU activation ``silu(gate) * up``: Triton forward/backward and the autograd Function.

The fused op reads gate and up once and writes one tensor (the unfused path writes silu(gate)
and keeps it for backward); the backward recomputes the sigmoid instead of storing it. Math is
fp32 inside the kernel. Reference: :func:`bigtrain.kernels.reference.swiglu_exact`.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from bigtrain.kernels.reference import swiglu_exact as reference  # noqa: F401  (the op's reference)
from bigtrain.kernels.triton_utils import launch_device

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * sig * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, elementwise; gate and up have the same shape and dtype."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        with launch_device(gate):
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        with launch_device(gate):
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up through the Triton kernels."""
    y: torch.Tensor = SwiGLUFunction.apply(gate, up)
    return y
