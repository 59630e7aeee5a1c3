"""Throughput, MFU and memory measurements."""
from __future__ import annotations

import math
import os
import resource
import sys

import torch

# Peak dense bf16 tensor-core FLOP/s (no sparsity), matched by substring of the device name.
# Order matters: more specific names first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A6000", 155e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None when unknown (then MFU is reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization (0..1) or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / peak


def host_rss_bytes() -> int:
    """Peak resident set size of this process."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (falls back to the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return host_rss_bytes()


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory for a train record, in GiB: peak allocated/reserved by the CUDA caching allocator
    since the start of the process (reserved - allocated is fragmentation/cache) and the host RSS
    now (what a node's OOM killer looks at)."""
    stats = {"host_rss_gib": current_rss_bytes() / 2**30}
    if device.type == "cuda":
        stats["peak_mem_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def memory_gib(device: torch.device) -> float:
    """Peak device memory allocated (CUDA) or peak host RSS (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_rss_bytes() / 2**30


def bits_per_byte(loss_nats_sum: float, num_bytes: int) -> float:
    """Convert summed token losses (nats) into bits per UTF-8 byte of text."""
    return loss_nats_sum / (math.log(2) * max(1, num_bytes))


def cpu_threads() -> int:
    return torch.get_num_threads() if torch.get_num_threads() else (os.cpu_count() or 1)
