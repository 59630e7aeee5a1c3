"""``model.kernels: torch | triton``: which implementation each fused op uses.

Each op has a plain-PyTorch reference (:mod:`bigtrain.kernels.reference`) and a Triton kernel
with its autograd Function (:mod:`~bigtrain.kernels.rmsnorm`, :mod:`~bigtrain.kernels.rotary`,
:mod:`~bigtrain.kernels.swiglu`, :mod:`~bigtrain.kernels.linear_cross_entropy`). The functions
here pick one per call: Triton when ``kernels == "triton"`` and the tensor is on a CUDA device (or
Triton's CPU interpreter is forced with ``TRITON_INTERPRET=1``, which the tests do), the reference
otherwise — logged once. This module imports torch only; a Triton module is imported on first use.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from bigtrain import messages
from bigtrain.kernels import reference
from bigtrain.kernels.reference import IGNORE_INDEX

KERNEL_BACKENDS = ("torch", "triton")
_warned: set[str] = set()


def _interpreter_forced() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on CPU tensors only under the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreter_forced())


def fallback_reason(kernels: str, device: torch.device) -> str | None:
    """Why ``kernels: triton`` falls back to the torch reference on ``device`` (None = it does not)."""
    if kernels != "triton":
        return None
    if not triton_available():
        return "the triton package is not installed"
    if not triton_runs_on(device):
        return f"Triton kernels need a CUDA device, this run is on {device.type}"
    return None


def describe(kernels: str, device: torch.device) -> str:
    """One line for the run header: which implementation the fused ops use on ``device``."""
    if kernels == "torch":
        return "torch (reference ops)"
    reason = fallback_reason(kernels, device)
    if reason:
        return f"torch reference ops (model.kernels=triton requested, but {reason})"
    return "triton (fused RMSNorm, rotary, SwiGLU, linear+cross-entropy)" + (
        " [interpreter]" if device.type == "cpu" else "")


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Dispatch decision for one call; logs the fallback the first time per device type."""
    if kernels != "triton":
        return False
    reason = fallback_reason(kernels, x.device)
    if reason is None:
        return True
    if x.device.type not in _warned and x.device.type != "meta":
        _warned.add(x.device.type)
        messages.warn(f"warning: model.kernels=triton: {reason}; using the torch reference ops.")
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "torch") -> torch.Tensor:
    if use_triton(kernels, x):
        from bigtrain.kernels.rmsnorm import rms_norm as fused

        return fused(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None = None, kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k [B, Hk, S, D]; cos/sin the full [max_seq, D/2] tables; positions [B, S] or None."""
    if use_triton(kernels, q):
        from bigtrain.kernels.rotary import rotary as fused

        return fused(q, k, cos, sin, positions)
    return reference.rotary(q, k, cos, sin, positions)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    if use_triton(kernels, gate):
        from bigtrain.kernels.swiglu import swiglu as fused

        return fused(gate, up)
    return reference.swiglu(gate, up)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         z_loss: float = 0.0, ignore_index: int = IGNORE_INDEX, kernels: str = "torch") -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``targets`` (+ z-loss); hidden [tokens, dim], targets [tokens]."""
    if use_triton(kernels, hidden):
        from bigtrain.kernels.linear_cross_entropy import linear_cross_entropy as fused

        return fused(hidden, weight, targets, ignore_index=ignore_index, z_loss=z_loss)
    return reference.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, z_loss=z_loss)


__all__ = ["IGNORE_INDEX", "KERNEL_BACKENDS", "describe", "fallback_reason", "linear_cross_entropy", "rms_norm",
           "rotary", "swiglu", "triton_available", "triton_runs_on", "use_triton"]
