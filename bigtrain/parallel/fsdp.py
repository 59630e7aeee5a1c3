"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

The meta-device model is sharded block by block and then at the root, on a 1-D DeviceMesh
(plain FSDP) or a 2-D ("replicate", "shard") mesh (HSDP); only then is it materialized with
``to_empty`` and initialized shard by shard, so no rank ever holds the full model. Checkpoints
are sharded (:mod:`bigtrain.checkpoint.dcp`: each rank writes its own DTensor shards with
torch.distributed.checkpoint, which reshards on load).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.parallel import dist
from bigtrain.parallel.apply import blocks, parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.grads import clip_grad_norm_
from bigtrain.parallel.init import sharded_filler
from bigtrain.parallel.strategy import OptimizerFactory, Strategy

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPStrategy(Strategy):
    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig, *, compile: bool = False) -> None:
        super().__init__(info, precision)
        self.cfg, self.fcfg, self.compile = cfg, cfg.fsdp, compile
        # Parameters are all-gathered in param_dtype and the blocks compute in it, so FSDP's
        # mixed precision replaces autocast whenever it matches the run's compute dtype.
        self.param_dtype = self.compute_dtype if self.fcfg.param_dtype == "auto" else _DTYPES[self.fcfg.param_dtype]
        self.reduce_dtype = _DTYPES[self.fcfg.reduce_dtype]
        if self.param_dtype != torch.float32 and self.fcfg.param_dtype != "auto":
            self.compute_dtype = self.param_dtype
        self.mesh: Any = None

    # -- setup ---------------------------------------------------------------------
    def _build_mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        replicas, world = self.fcfg.replicate_degree, self.info.world_size
        if replicas > 1:
            return init_device_mesh(self.device.type, (replicas, world // replicas),
                                    mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(self.device.type, (world,), mesh_dim_names=("shard",))

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.info.world_size == 1:
            messages.warn("bigtrain: note: parallel.strategy=fsdp on one process: nothing is sharded (mixed precision "
                          "and CPU offload still apply); launch more processes with torchrun to shard.")
        dist.ensure_process_group(self.info, dist.resolve_backend(self.cfg.backend, self.device), self.cfg.timeout_s)
        self.mesh = self._build_mesh()
        mp = MixedPrecisionPolicy(param_dtype=None if self.param_dtype == torch.float32 else self.param_dtype,
                                  reduce_dtype=self.reduce_dtype)
        common: dict[str, Any] = {"mesh": self.mesh, "mp_policy": mp}
        if self.fcfg.cpu_offload:
            common["offload_policy"] = CPUOffloadPolicy()
        last = blocks(model)[-1]

        def shard(module: nn.Module, is_root: bool) -> None:
            # The last block is needed again at once by backward: resharding it would only add an all-gather.
            reshard = self.fcfg.reshard_after_forward and module is not last and not is_root
            fully_shard(module, reshard_after_forward=reshard, **common)

        parallelize(model, self.cfg, compile=self.compile, shard=shard)
        # Sharded parameters live in host memory under CPU offload; buffers are used by compute.
        model.to_empty(device="cpu" if self.fcfg.cpu_offload else self.device)
        model.init_weights(seed, fill=sharded_filler(seed))  # type: ignore[operator]  # a Decoder, typed nn.Module
        if self.fcfg.cpu_offload and self.device.type != "cpu":
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)
        return model, make_optimizer(model)

    # -- step ----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.param_dtype == self.compute_dtype:
            return contextlib.nullcontext()  # MixedPrecisionPolicy already computes in compute_dtype
        return super().autocast()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Plain FSDP reduce-scatters every micro-batch (never holds unsharded gradients);
        HSDP skips only the all-reduce across replicas until the last micro-batch."""
        if self.fcfg.replicate_degree > 1:
            model.set_requires_all_reduce(False)  # type: ignore[operator]  # added by fully_shard
            try:
                yield
            finally:
                model.set_requires_all_reduce(True)  # type: ignore[operator]  # added by fully_shard
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model.parameters(), max_norm)  # DTensor-aware: the full-gradient norm

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
