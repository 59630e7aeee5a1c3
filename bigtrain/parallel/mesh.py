"""The parallel layout: how the ranks of a launch split into pipeline, data, context and tensor parallelism.

This is the one module that knows the layout. :class:`Layout` is plain arithmetic (it needs no
process group, so the data pipeline and ``bigtrain config check`` use it before one exists);
:class:`ParallelMesh` is the named ``DeviceMesh`` built from it, and every parallel feature asks
it for the sub-mesh it needs instead of computing ranks itself.

Dimensions, outermost first (a rank's coordinates are its index in row-major order, so the
innermost dimension, ``tp``, spans neighbouring ranks: the GPUs of one node)::

    pp            pipeline stages (parallel.pipeline_parallel)
    dp_replicate  HSDP replica groups (parallel.fsdp.replicate_degree)
    dp_shard      FSDP2 sharding: what is left of the world size
    cp            context parallelism (parallel.context_parallel)
    tp            tensor parallelism (parallel.tensor_parallel)

A derived (flattened) dimension: ``dp_shard_cp`` = dp_shard x cp, what FSDP2 shards over
(context-parallel peers hold the same weights and their gradients are averaged like data-parallel
ones). dp_replicate x dp_shard are the ranks that read different batches (:meth:`Layout.data_rank`).

Mixture-of-Experts layers are not tensor-sharded: each tensor-parallel rank routes its own sequence
shard, so for them the ranks that hold different tokens are dp_shard x cp x tp (``moe_tokens``; just
``dp_shard_cp`` without tensor parallelism). Their weights are FSDP-sharded over all of those ranks
(:attr:`ParallelMesh.moe_fsdp`) and their gradients summed over them (parallel/ep.py).

Expert parallelism (``parallel.expert_parallel``) is drawn from those ranks, as in torchtitan: that
dimension is unflattened into ``dp_shard_mod_ep`` x ``ep`` (``ep`` innermost, so an expert-parallel
group is neighbouring ranks: tensor-parallel peers first, then context-parallel ones). Each ``ep``
group splits the routed experts between its ranks; expert weights are FSDP-sharded over the rest,
``dp_shard_mod_ep`` (x ``dp_replicate`` for HSDP): :attr:`ParallelMesh.expert_fsdp`. Nothing else
changes: the root mesh, the dense weights' sharding and the data ranks are those of ep = 1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bigtrain.sections import ConfigError

if TYPE_CHECKING:
    from bigtrain.parallel.config import ParallelConfig

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
_CONFIG_KEYS = {"pp": "parallel.pipeline_parallel", "dp_replicate": "parallel.fsdp.replicate_degree",
                "cp": "parallel.context_parallel", "tp": "parallel.tensor_parallel"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    """Degrees of every dimension for one world size (their product is the world size)."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    # Not a dimension of the root mesh: a split of dp_shard x cp x tp (see the module doc string).
    ep: int = 1

    def __post_init__(self) -> None:
        assert self.moe_token_ranks % self.ep == 0, f"ep {self.ep} must divide dp_shard x cp x tp ({self})"

    @property
    def moe_token_ranks(self) -> int:
        """The ranks of one data-parallel replica that route different tokens (dp_shard x cp x tp)."""
        return self.dp_shard * self.cp * self.tp

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> Layout:
        """The layout ``cfg`` asks for on ``world_size`` ranks; exit 2 with a valid layout when it does not factor."""
        fixed = {"pp": cfg.pipeline_parallel, "dp_replicate": cfg.fsdp.replicate_degree,
                 "cp": cfg.context_parallel, "tp": cfg.tensor_parallel}
        product = 1
        for degree in fixed.values():
            product *= degree
        if world_size % product:
            raise ConfigError(cls._does_not_factor(fixed, product, world_size))
        layout = cls(dp_shard=world_size // product, **fixed)
        ep = cfg.expert_parallel
        if ep > 1 and layout.moe_token_ranks % ep:
            raise ConfigError(layout._ep_does_not_fit(ep, world_size))
        return replace(layout, ep=ep)

    def _ep_does_not_fit(self, ep: int, world_size: int) -> str:
        span = self.moe_token_ranks
        what = " x ".join(f"{d} {getattr(self, d)}" for d in ("dp_shard", "cp", "tp") if d == "dp_shard"
                          or getattr(self, d) > 1)
        others = [_CONFIG_KEYS[d] for d in ("dp_replicate", "pp") if getattr(self, d) > 1]
        outside = f"; {', '.join(others)} {'is' if len(others) == 1 else 'are'} not part of it" if others else ""
        fits = ", ".join(str(d) for d in _divisors(span))
        return (f"parallel.expert_parallel={ep} must divide the data-, context- and tensor-parallel ranks the "
                f"experts are split over ({what} = {span} on {world_size} processes{outside}); expert_parallel "
                f"values that fit this launch: {fits}; or launch a multiple of {ep * (world_size // span)} "
                f"processes.")

    @staticmethod
    def _does_not_factor(fixed: dict[str, int], product: int, world_size: int) -> str:
        given = " x ".join(f"{_CONFIG_KEYS[d]}={v}" for d, v in fixed.items() if v > 1)
        hints = []
        for dim, degree in fixed.items():
            if degree == 1:
                continue
            others = product // degree
            if world_size % others == 0:
                choices = [d for d in _divisors(world_size // others) if d != degree]
                hints.append(f"{_CONFIG_KEYS[dim]} in {{{', '.join(map(str, choices))}}}")
        multiples = ", ".join(str(product * k) for k in range(1, 4))
        suggestion = (f"valid layouts for {world_size} processes: {' or '.join(hints)}; or launch a multiple of "
                      f"{product} processes ({multiples}, ...)") if hints else (
            f"launch a multiple of {product} processes ({multiples}, ...)")
        return (f"the parallel layout does not fit this launch: {given} needs a multiple of {product} processes, "
                f"but there are {world_size} (the FSDP shard degree is world size / ({product}), which must be a "
                f"whole number); {suggestion}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different batches."""
        return self.dp_replicate * self.dp_shard

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along every dimension (row-major: tp varies fastest)."""
        coords: dict[str, int] = {}
        for dim in reversed(DIMS):
            size = getattr(self, dim)
            coords[dim] = rank % size
            rank //= size
        return {d: coords[d] for d in DIMS}

    def data_rank(self, rank: int) -> int:
        """The data pipeline's rank: pipeline/tensor/context-parallel peers share it (and read the same batch)."""
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    @property
    def expert_fsdp_size(self) -> int:
        """The ranks each expert's weights are FSDP-sharded over (dp_shard x cp x tp / ep, times dp_replicate)."""
        return self.dp_replicate * self.moe_token_ranks // self.ep

    def describe(self) -> str:
        """e.g. ``dp_shard 2 x tp 2`` (dimensions of size 1 left out; ``1 rank`` when all are), then the
        expert-parallel split of the data-parallel ranks, e.g. ``dp_shard 4 (ep 2)``."""
        parts = [f"{d} {getattr(self, d)}" for d in DIMS if getattr(self, d) > 1]
        text = " x ".join(parts) if parts else "1 rank"
        return f"{text} (ep {self.ep})" if self.ep > 1 else text


class ParallelMesh:
    """The named ``DeviceMesh`` of a :class:`Layout` and the sub-meshes each feature uses."""

    def __init__(self, layout: Layout, device_type: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.layout = layout
        self.mesh: Any = init_device_mesh(device_type, layout.shape, mesh_dim_names=DIMS)
        # The flattened view is kept, not sliced again from the root (which torch deprecates).
        # ``_flatten`` is private in every torch that has it (2.4+); torchtitan relies on it too.
        self._dp_shard_cp = self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        self._moe_tokens: Any = None  # dp_shard x cp x tp, flattened when a MoE model first asks for it
        self._sequence_shards: Any = None  # cp x tp, likewise
        # Expert parallelism: moe_tokens unflattened into (dp_shard_mod_ep, ep), ep innermost; built
        # only when asked, so dense layouts create exactly the process groups they always did.
        self._ep_split: Any = None
        if layout.ep > 1:
            span = layout.moe_token_ranks
            self._ep_split = self.moe_tokens._unflatten(0, (span // layout.ep, layout.ep), ("dp_shard_mod_ep", "ep"))

    @property
    def moe_tokens(self) -> Any:
        """dp_shard x cp x tp flattened (1-D): the ranks of one replica that route different tokens in MoE layers
        (``dp_shard_cp`` without tensor parallelism). Every rank must ask at the same point (it may create
        process groups)."""
        if self.layout.tp == 1:
            return self._dp_shard_cp
        if self._moe_tokens is None:
            self._moe_tokens = self.mesh["dp_shard", "cp", "tp"]._flatten("dp_shard_cp_tp")
        return self._moe_tokens

    @property
    def sequence_shards(self) -> Any:
        """cp x tp (1-D, flattened when both are > 1): the ranks that split one sequence between them."""
        if self.layout.cp == 1 or self.layout.tp == 1:
            return self.mesh["tp" if self.layout.cp == 1 else "cp"]
        if self._sequence_shards is None:
            self._sequence_shards = self.mesh["cp", "tp"]._flatten("cp_tp")
        return self._sequence_shards

    @property
    def moe_fsdp(self) -> Any:
        """What FSDP2 shards MoE layers' routers and shared experts (and routed experts without expert
        parallelism) over: :attr:`moe_tokens` (with ``dp_replicate`` in front for HSDP); :attr:`fsdp`
        without tensor parallelism."""
        if self.layout.tp == 1:
            return self.fsdp
        return self._with_replicate(self.moe_tokens)

    def _with_replicate(self, shard_mesh: Any) -> Any:
        """``shard_mesh`` with the HSDP replica dimension in front (itself without HSDP)."""
        if self.layout.dp_replicate == 1:
            return shard_mesh
        from torch.distributed.device_mesh import DeviceMesh

        # torch's own way to join orthogonal sub-meshes of one root (private, like _flatten; FSDP2 uses it).
        return DeviceMesh._concatenate([self.mesh["dp_replicate"], shard_mesh])

    @property
    def fsdp(self) -> Any:
        """What FSDP2 shards over: (dp_replicate, dp_shard_cp) for HSDP, else dp_shard_cp."""
        if self.layout.dp_replicate == 1:
            return self._dp_shard_cp
        if self.layout.cp == 1:
            return self.mesh["dp_replicate", "dp_shard"]
        with warnings.catch_warnings():  # HSDP x CP needs a 2-D mesh with a flattened dimension
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return self.mesh["dp_replicate", "dp_shard_cp"]

    @property
    def ep(self) -> Any:
        """The expert-parallel sub-mesh (1-D, ``layout.ep`` ranks that split the routed experts); None
        when expert parallelism is off."""
        return None if self._ep_split is None else self._ep_split["ep"]

    @property
    def expert_fsdp(self) -> Any:
        """What FSDP2 shards the expert weights over: ``dp_shard_mod_ep`` (with ``dp_replicate`` in front for
        HSDP); the same as :attr:`moe_fsdp` when expert parallelism is off."""
        if self._ep_split is None:
            return self.moe_fsdp
        return self._with_replicate(self._ep_split["dp_shard_mod_ep"])

    @property
    def tp(self) -> Any:
        return self.mesh["tp"]

    @property
    def cp(self) -> Any:
        return self.mesh["cp"]

    @property
    def pp(self) -> Any:
        return self.mesh["pp"]
