"""Initialization of sharded (DTensor) parameters that reproduces the unsharded weights exactly.

:mod:`bigtrain.model.init` draws each parameter in fixed-size blocks of its flattened full
tensor; here a rank computes where its local shard sits in that flat tensor and draws only the
blocks overlapping it (dim-0 sharding, what FSDP2 does, possibly uneven), or the rows of its block
at full width (tensor parallelism's column splits).
"""
from __future__ import annotations

import math

import torch

from bigtrain.model.init import Filler, normal_range, seeded_filler


def local_row_range(param: torch.Tensor) -> tuple[int, int]:
    """(first row, number of rows) of this rank's shard of a DTensor sharded on dim 0.

    Shard(0) follows ``torch.chunk``: chunks of ceil(rows / n), the last ones shorter or empty.
    Several Shard(0) mesh dimensions (e.g. nested sharding) split the range one after another.
    """
    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]  # a DTensor (the caller checked)
    coordinate = mesh.get_coordinate()
    start, length = 0, param.shape[0]
    if coordinate is None:  # this rank is not part of the mesh
        return 0, 0
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if not (placement.is_shard() and placement.dim == 0) or type(placement).__name__ != "Shard":
            raise NotImplementedError(f"sharded init supports Shard(0) and Replicate placements, got {placement}")
        chunk = math.ceil(length / mesh.size(mesh_dim))
        lo = min(coordinate[mesh_dim] * chunk, length)
        hi = min(lo + chunk, length)
        start, length = start + lo, hi - lo
    return start, length


def _local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's block of a DTensor with any placements.

    torch computes this for DCP (which must know where every shard sits), including FSDP2's strided
    sharding of tensor-parallel weights; a rank's block is always a box of the full tensor.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements)  # type: ignore[attr-defined]  # a DTensor (the caller checked)
    return tuple(shape), tuple(offset)


def sharded_filler(seed: int) -> Filler:
    """A filler that accepts DTensor parameters (and plain tensors) and draws only the local shard.

    Dim-0 sharding (FSDP2) draws exactly the local rows. Other placements (tensor parallelism
    splits columns too) draw the local rows at full width and keep the local columns.
    """
    plain = seeded_filler(seed)

    @torch.no_grad()
    def fill(param: torch.Tensor, std: float, name: str) -> None:
        from torch.distributed.tensor import DTensor
        if not isinstance(param, DTensor):
            plain(param, std, name)
            return
        local = param.to_local()
        if all(p.is_replicate() or (type(p).__name__ == "Shard" and p.dim == 0)  # type: ignore[attr-defined]  # Shard has .dim
               for p in param.placements):
            first_row, rows = local_row_range(param)
            assert rows == (local.shape[0] if local.ndim else 1), (name, rows, tuple(local.shape))
            row_numel = math.prod(param.shape[1:])
            values = normal_range(param.numel(), first_row * row_numel, rows * row_numel, std, seed, name,
                                  local.device)
            local.copy_(values.view(local.shape))
            return
        shape, offset = _local_box(param)
        assert tuple(local.shape) == shape, (name, shape, tuple(local.shape))
        if local.numel() == 0:
            return
        row_numel = math.prod(param.shape[1:])
        drawn = normal_range(param.numel(), offset[0] * row_numel, shape[0] * row_numel, std, seed, name,
                             local.device)
        block = drawn.view(shape[0], *param.shape[1:])
        for dim in range(1, len(shape)):
            block = block.narrow(dim, offset[dim], shape[dim])
        local.copy_(block)

    return fill
