"""RMSNorm: Triton forward/backward kernels and their autograd Function.

Forward keeps one fp32 ``rstd`` per row for the backward. The weight gradient is reduced in fp32:
each program sums its rows' contributions into one fp32 partial row, and the partials are summed
in fp32 by torch before the cast to the weight's dtype. Importing this module imports Triton; the
plain-PyTorch reference is :func:`bigtrain.kernels.reference.rms_norm`.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from bigtrain.kernels.reference import rms_norm as reference  # noqa: F401  (the op's reference)
from bigtrain.kernels.triton_utils import launch_device, num_row_programs, row_warps


@triton.jit
def _rmsnorm_fwd(  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, rows_per_program, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = w * dy
        # d/dx of x * rstd: rstd * (g - xhat * mean(g * xhat)) with g = w * dy.
        c = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim; fp32 math, output in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m, n = x2.shape
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        with launch_device(x):
            block = triton.next_power_of_2(n)
            _rmsnorm_fwd[(m,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps,
                               BLOCK_N=block, num_warps=row_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = num_row_programs(m, x2.device)
        rows_per_program = triton.cdiv(m, programs)
        programs = triton.cdiv(m, rows_per_program)
        partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        with launch_device(x2):
            _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                      m, n, rows_per_program, BLOCK_N=triton.next_power_of_2(n),
                                      num_warps=row_warps(triton.next_power_of_2(n)))
        dw = partial.sum(0).to(weight.dtype)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through the Triton kernels (differentiable in x and weight)."""
    y: torch.Tensor = RMSNormFunction.apply(x, weight, eps)
    return y
