"""RMSNorm, rotary and SwiGLU Triton kernels (run by Triton's CPU interpreter) against float64 references.

Fresh random inputs each case; forward outputs and every gradient are compared. Shapes include
non-power-of-two hidden sizes (masked tails), odd row counts and grouped-query head counts.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_testing import assert_close, leaf64  # sets TRITON_INTERPRET=1 first

# isort: split

from bigtrain.kernels import reference as ref
from bigtrain.kernels import rmsnorm, rotary, swiglu
from bigtrain.model.decoder import rotary_tables

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 96), (5, 200), (1, 1, 64), (13, 130)])
def test_rmsnorm_matches_float64(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = rmsnorm.rms_norm(x, w, 1e-5)
    y.backward(dy)
    x64, w64 = leaf64(x), leaf64(w)
    y64 = ref.rms_norm(x64, w64, 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "rmsnorm out")
    assert_close(x.grad, x64.grad, dtype, "rmsnorm dx")
    assert_close(w.grad, w64.grad, dtype, "rmsnorm dw")


def test_rmsnorm_weight_grad_reduced_in_fp32_over_many_rows() -> None:
    """bf16 rows, fp32 weight: the weight gradient is summed over rows in fp32 and comes back in fp32."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 40, generator=gen).to(torch.bfloat16)
    w = torch.ones(40, requires_grad=True)
    dy = torch.randn(96, 40, generator=gen).to(torch.bfloat16)
    rmsnorm.rms_norm(x, w, 1e-5).backward(dy)
    w64 = torch.ones(40, dtype=torch.float64, requires_grad=True)
    ref.rms_norm(x.double(), w64, 1e-5).backward(dy.double())
    assert w.grad.dtype == torch.float32
    assert_close(w.grad, w64.grad, torch.bfloat16, "rmsnorm dw")
    assert (w.grad.double() - w64.grad).norm() / w64.grad.norm() < 5e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,seq,hq,hk,dim,with_positions", [
    (2, 5, 4, 2, 12, False),   # GQA, head_dim/2 = 6 (not a power of two)
    (1, 9, 3, 3, 8, True),     # odd head count, explicit positions
    (2, 4, 6, 1, 20, True),    # multi-query, half = 10
])
def test_rotary_matches_float64(dtype: torch.dtype, bsz: int, seq: int, hq: int, hk: int, dim: int,
                                with_positions: bool) -> None:
    gen = torch.Generator().manual_seed(seq * 31 + dim)
    # The attention layer's layout: [B, S, H, D] memory viewed as [B, H, S, D].
    q = torch.randn(bsz, seq, hq, dim, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(bsz, seq, hk, dim, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    cos, sin = rotary_tables(dim, 32, 10000.0)
    positions = torch.randint(0, 32, (bsz, seq), generator=gen) if with_positions else None
    qo, ko = rotary.rotary(q, k, cos, sin, positions)
    gq, gk = torch.randn(qo.shape, generator=gen).to(dtype), torch.randn(ko.shape, generator=gen).to(dtype)
    ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
    q64, k64 = leaf64(q), leaf64(k)
    qr, kr = ref.rotary(q64, k64, cos.double(), sin.double(), positions)
    ((qr * gq.double()).sum() + (kr * gk.double()).sum()).backward()
    for name, a, e in (("q", qo, qr), ("k", ko, kr), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
        assert_close(a, e, dtype, f"rotary {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 300), (2, 3, 1000), (7,)])
def test_swiglu_matches_float64(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
    g = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    u = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype)
    y = swiglu.swiglu(g, u)
    y.backward(dy)
    g64, u64 = leaf64(g), leaf64(u)
    y64 = ref.swiglu_exact(g64, u64)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "swiglu out")
    assert_close(g.grad, g64.grad, dtype, "swiglu dgate")
    assert_close(u.grad, u64.grad, dtype, "swiglu dup")


def test_swiglu_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        swiglu.swiglu(torch.zeros(3, 4), torch.zeros(3, 5))
