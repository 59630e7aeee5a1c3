"""Small helpers shared by the Triton kernel modules (imported only when a kernel is used)."""
from __future__ import annotations

import contextlib
import os

import torch


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Launch on ``x``'s GPU (matters with several visible GPUs); nothing to do on the interpreter."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def row_warps(block: int) -> int:
    """Warps for one program that reduces a row of ``block`` elements (more warps for wider rows)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def num_row_programs(rows: int, device: torch.device) -> int:
    """How many programs share a row-reduction: a few per SM on GPU, few on the (slow) interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))
