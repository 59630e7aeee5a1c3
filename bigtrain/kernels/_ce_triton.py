"""The Triton per-row cross-entropy pass of :mod:`bigtrain.kernels.linear_cross_entropy`.

Kept in its own module so the fused op can run its torch fallback without importing Triton.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ce_rows_kernel(  # type: ignore[no-untyped-def]  # Triton reads parameter annotations as types
    LOGITS, TARGETS, LOSS, stride_row, V, ignore_index, z_loss, BLOCK_V: tl.constexpr
):
    """One program per row: online log-sum-exp over vocabulary tiles, the row loss, then the
    gradient ``softmax * (1 + 2 z lse) - onehot(target)`` written over the logits (0 for ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int32)
    valid = target != ignore_index
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe = tl.where(valid, target, 0)
    x_t = tl.load(ptr + safe).to(tl.float32)
    loss = tl.where(valid, lse - x_t + z_loss * lse * lse, 0.0)
    tl.store(LOSS + row, loss)
    factor = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * factor - tl.where(cols == safe, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)
