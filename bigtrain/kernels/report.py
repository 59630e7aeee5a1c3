"""The run header's ``kernels`` line: fused-op backend, attention kernel, FP8 (imports torch only)."""
from __future__ import annotations

import torch

from bigtrain.kernels import dispatch as K
from bigtrain.kernels.attention import describe as describe_attention


def describe_kernels(kernels: str, *, fp8: bool, head_dim: int, device: torch.device,
                     compute_dtype: torch.dtype) -> str:
    """e.g. ``triton (fused ...); attention SDPA flash; ...; fp8 on`` for ``device``.

    Takes the model's ``kernels``, ``fp8`` and ``head_dim`` values rather than its config: kernels sit
    below the model in the import layering.
    """
    fp8_note = ""
    if fp8:
        fp8_note = "; fp8 linears (torchao, " + ("emulated" if device.type != "cuda" else "float8 tensor cores") + ")"
    return (f"{K.describe(kernels, device)}; attention {describe_attention(device, compute_dtype, head_dim)}"
            f"{fp8_note}")
