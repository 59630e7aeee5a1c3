"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

The meta-device model is first split by tensor and context parallelism when asked, then sharded
block by block and at the root over the FSDP part of the named mesh (:mod:`bigtrain.parallel.mesh`:
``dp_shard_cp``, or ``dp_replicate`` x ``dp_shard_cp`` for HSDP); only then is it materialized with
``to_empty`` and initialized shard by shard, so no rank ever holds the full model. Checkpoints
are sharded (:mod:`bigtrain.checkpoint.dcp`: each rank writes its own DTensor shards with
torch.distributed.checkpoint, which reshards on load).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.kernels.reference import cross_entropy
from bigtrain.model.moe import moe_layers
from bigtrain.parallel import dist
from bigtrain.parallel.apply import blocks, parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.grads import clip_grad_norm_
from bigtrain.parallel.init import sharded_filler
from bigtrain.parallel.mesh import Layout, ParallelMesh
from bigtrain.parallel.pp import Pipeline, PipelineDecoder, split_for_pipeline
from bigtrain.parallel.strategy import Description, MicroBatch, OptimizerFactory, Strategy

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig, *, compile: bool | str = False,
                 micro_batch_size: int = 1, accum_steps: int = 1) -> None:
        super().__init__(info, precision)
        self.cfg, self.fcfg, self.compile = cfg, cfg.fsdp, compile
        self.num_microbatches = cfg.check_microbatches(micro_batch_size * accum_steps, accum_steps)
        self.pipeline: Pipeline | None = None
        # Parameters are all-gathered in param_dtype and the blocks compute in it, so FSDP's
        # mixed precision replaces autocast whenever it matches the run's compute dtype.
        self.param_dtype = self.compute_dtype if self.fcfg.param_dtype == "auto" else _DTYPES[self.fcfg.param_dtype]
        self.reduce_dtype = _DTYPES[self.fcfg.reduce_dtype]
        if self.param_dtype != torch.float32 and self.fcfg.param_dtype != "auto":
            self.compute_dtype = self.param_dtype
        self.mesh: ParallelMesh | None = None

    # -- setup ---------------------------------------------------------------------
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.info.world_size == 1:
            messages.warn("bigtrain: note: parallel.strategy=fsdp on one process: nothing is sharded (mixed precision "
                          "and CPU offload still apply); launch more processes with torchrun to shard.")
        dist.ensure_process_group(self.info, dist.resolve_backend(self.cfg.backend, self.device), self.cfg.timeout_s)
        self.mesh = ParallelMesh(Layout.from_config(self.cfg, self.info.world_size), self.device.type)
        # The one ordered place: pipeline split -> tensor parallelism -> context parallelism -> expert
        # parallelism -> (act-ckpt -> fp8 -> compile -> FSDP2, MoE layers first: parallel/ep.py).
        stages = None
        if self.cfg.pipeline_parallel > 1:
            stages = split_for_pipeline(model, self.mesh.pp, self.cfg.pipeline_virtual_stages)
        if self.cfg.tensor_parallel > 1:
            from bigtrain.parallel.tp import apply_tensor_parallel

            apply_tensor_parallel(model, self.mesh.tp)
        if self.cfg.context_parallel > 1:
            from bigtrain.parallel.cp import apply_context_parallel

            apply_context_parallel(model, self.mesh.cp)
        if self.cfg.context_parallel > 1 or self.cfg.tensor_parallel > 1:
            from bigtrain.parallel.ep import sum_routing_over_sequence_shards

            sum_routing_over_sequence_shards(model, self.mesh)  # MoE layers route each rank's sequence shard
        expert_parallel = self.cfg.expert_parallel > 1
        if expert_parallel:
            from bigtrain.parallel.ep import apply_expert_parallel

            apply_expert_parallel(model, self.mesh)
        # fp64 runs gather and reduce in float64: "fp32" reduction means full precision there.
        full_reduce = self.master_dtype == torch.float64 and self.reduce_dtype == torch.float32
        mp = MixedPrecisionPolicy(param_dtype=None if self.param_dtype == self.master_dtype else self.param_dtype,
                                  reduce_dtype=None if full_reduce else self.reduce_dtype)
        common: dict[str, Any] = {"mesh": self.mesh.fsdp, "mp_policy": mp}
        if self.fcfg.cpu_offload:
            common["offload_policy"] = CPUOffloadPolicy()
        last = blocks(model)[-1]
        zero_bubble = stages is not None and self.cfg.pipeline_schedule == "interleaved_zb"
        if zero_bubble and self.fcfg.reshard_after_forward:
            messages.say("bigtrain: note: parallel.pipeline_schedule=interleaved_zb keeps each stage's gathered "
                         "parameters from forward to backward (parallel.fsdp.reshard_after_forward=false): its "
                         "split weight-gradient pass needs them.")
        # MoE layers get FSDP2 groups of their own under expert or tensor parallelism (parallel/ep.py shard_moe).
        own_moe_groups = expert_parallel or (self.cfg.tensor_parallel > 1 and bool(moe_layers(model)))

        def shard(module: nn.Module, is_root: bool) -> None:
            # The last block is needed again at once by backward: resharding it would only add an all-gather.
            reshard = (self.fcfg.reshard_after_forward and module is not last and not is_root
                       and not zero_bubble)
            if own_moe_groups and not is_root:
                from bigtrain.parallel.ep import shard_moe

                assert self.mesh is not None
                shard_moe(module, self.mesh, reshard_after_forward=reshard,
                          **{k: v for k, v in common.items() if k != "mesh"})
            fully_shard(module, reshard_after_forward=reshard, **common)

        if stages is None:
            parallelize(model, self.cfg, compile=self.compile, shard=shard)
        else:
            # Each stage is a root (its forward is what the schedule calls); the rank's model only holds them.
            parallelize(model, self.cfg, compile=self.compile, shard=None)
            for block in blocks(model):
                shard(block, False)
            for stage in stages.values():
                shard(stage, True)
        # Sharded parameters live in host memory under CPU offload; buffers are used by compute.
        model.to_empty(device="cpu" if self.fcfg.cpu_offload else self.device)
        model.init_weights(seed, fill=sharded_filler(seed))  # type: ignore[operator]  # a Decoder, typed nn.Module
        if self.fcfg.cpu_offload and self.device.type != "cpu":
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)
        if stages is not None:
            assert isinstance(model, PipelineDecoder)
            z_loss = model.cfg.z_loss

            def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                return cross_entropy(logits.flatten(0, 1), targets.flatten(), z_loss=z_loss)

            self.pipeline = Pipeline(model, schedule=self.cfg.pipeline_schedule, num_microbatches=self.num_microbatches,
                                     device=self.device, loss_fn=loss_fn)
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

    def forward_backward(self, model: nn.Module, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        if self.pipeline is None:
            return super().forward_backward(model, micro_batches)
        # The pipeline splits the step's sequences into its own microbatches (accumulation folds into it).
        inputs = torch.cat([b.inputs for b in micro_batches])
        targets = torch.cat([b.targets for b in micro_batches])
        documents = {key: torch.cat([b.kwargs[key] for b in micro_batches]) for key in micro_batches[0].kwargs}
        cp_state = getattr(model, "cp_state", None)
        if cp_state is None:
            with self.autocast():
                return self.pipeline.step(inputs, targets, **documents)
        # Context parallelism: this rank's slice of every sequence, as the decoder's pre-hook cuts it.
        from bigtrain.parallel.cp import slice_sequence

        doc_ids = documents.get("doc_ids")
        inputs, targets, positions = slice_sequence(cp_state, inputs, targets, doc_ids, documents.get("positions"))
        cp_state.active = True
        try:
            with self.autocast():
                return self.pipeline.step(inputs, targets, doc_ids=doc_ids, positions=positions)
        finally:
            cp_state.active = False

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # DTensor-aware: the full-gradient norm; a pipeline adds up its stages' norms.
        group = self.mesh.pp.get_group() if self.mesh is not None and self.cfg.pipeline_parallel > 1 else None
        return clip_grad_norm_(model.parameters(), max_norm, pipeline_group=group)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- run header ------------------------------------------------------------------
    def describe(self) -> Description:
        """Adds the N-D layout (``fsdp (dp_shard 2 x tp 2)``) when tensor, context or pipeline parallelism is on."""
        described = super().describe()
        if not self.cfg.model_parallel_degrees:
            return described
        layout = Layout.from_config(self.cfg, self.info.world_size).describe()
        return described._replace(strategy=f"{described.strategy} ({layout})")
