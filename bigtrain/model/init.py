"""Sharding-independent random initialization.

Every parameter is seen as its flattened full tensor cut into fixed-size blocks; block ``b`` of
parameter ``name`` is drawn from its own generator seeded by ``(seed, name, b)``. Any contiguous
range of the flat tensor (the whole tensor, or one rank's shard of it) can therefore be filled
on its own, and the full weights are bit-identical however the model is split.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

BLOCK_NUMEL = 1 << 20

# (parameter or its local tensor, std, canonical parameter name) -> None; fills in place.
Filler = Callable[[torch.Tensor, float, str], None]


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed for one block, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normal_range(total_numel: int, start: int, count: int, std: float, seed: int, name: str,
                 device: torch.device) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened full tensor ``name`` (fp32, on ``device``)."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count == 0:
        return out
    first, last = start // BLOCK_NUMEL, (start + count - 1) // BLOCK_NUMEL
    gen = torch.Generator(device=device)
    for b in range(first, last + 1):
        lo = b * BLOCK_NUMEL
        n = min(BLOCK_NUMEL, total_numel - lo)  # always draw the whole block: same values whoever asks
        gen.manual_seed(block_seed(seed, name, b))
        block = torch.empty(n, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        a, z = max(start, lo), min(start + count, lo + n)
        out[a - start: z - start] = block[a - lo: z - lo]
    return out


def seeded_filler(seed: int | None) -> Filler:
    """The plain filler for whole (unsharded) tensors; ``seed=None`` uses the global torch RNG."""

    @torch.no_grad()
    def fill(param: torch.Tensor, std: float, name: str) -> None:
        if seed is None:
            nn.init.normal_(param, 0.0, std)
            return
        values = normal_range(param.numel(), 0, param.numel(), std, seed, name, param.device)
        param.copy_(values.view(param.shape))

    return fill
