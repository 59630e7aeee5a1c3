"""The run header's ``kernels`` line: fused-op backend, attention kernel, FP8 (imports torch only)."""
from __future__ import annotations

import torch

from bigtrain.kernels import dispatch as K
from bigtrain.kernels.attention import describe as describe_attention
from bigtrain.model.config import ModelConfig


def describe_kernels(cfg: ModelConfig, device: torch.device, compute_dtype: torch.dtype) -> str:
    """e.g. ``triton (fused ...); attention SDPA flash; ...; fp8 on`` for ``device``."""
    fp8 = ""
    if cfg.fp8:
        fp8 = "; fp8 linears (torchao, " + ("emulated" if device.type != "cuda" else "float8 tensor cores") + ")"
    return (f"{K.describe(cfg.kernels, device)}; attention {describe_attention(device, compute_dtype, cfg.head_dim)}"
            f"{fp8}")
