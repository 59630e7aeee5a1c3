"""Shared helpers for the kernel tests: Triton's CPU interpreter and float64 comparisons.

``TRITON_INTERPRET=1`` must be set before a ``@triton.jit`` kernel module is imported, so the
kernel test modules import :mod:`tests.kernels.kernel_testing` first.
"""
from __future__ import annotations

import os

import torch

os.environ["TRITON_INTERPRET"] = "1"

# The tolerances against a float64 reference (norm-wise relative error).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, both in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what} ({dtype}): relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def leaf64(x: torch.Tensor) -> torch.Tensor:
    """A float64 leaf copy of ``x`` for the reference computation."""
    return x.detach().double().requires_grad_(x.requires_grad)
