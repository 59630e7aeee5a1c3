"""The Strategy interface: everything the trainer needs from a parallelism backend, and nothing more.

The trainer calls only these methods, so switching single ↔ DDP ↔ FSDP2 ↔ ZeRO never
touches the loop or the model. Backends live in their own modules; :func:`build_strategy`
picks one from ``parallel.strategy``.

=========================  ===========================================================================
set-up                     ``wrap`` (shard/wrap a meta-device model, materialize, init, build the
                           optimizer), ``load_model_weights`` (``model.init_from``)
each step                  ``forward_backward`` (the step's micro-batches: ``autocast``, ``no_sync``
                           between them, ``backward``; a pipeline runs its schedule instead),
                           ``clip_grad_norm``, ``step``, ``reduce_mean`` (the logged loss, eval sums)
evaluation                 ``autocast`` around ``model(tokens)``
end of run / generation    ``barrier``, ``unwrap`` (the plain model inside the wrapper)
run header                 ``describe`` (the backend's name, its N-D layout, compiled blocks)
attributes                 ``info``, ``device``, ``compute_dtype``, ``checkpoint_format``
=========================  ===========================================================================

Checkpoints are not written here: ``checkpoint_format`` names the backend of
:mod:`bigtrain.checkpoint.backend` (``dcp`` or ``deepspeed``) that saves and loads this strategy's
state. ``held_state_bytes`` is for measurement (tests, ``bigtrain plan`` validation), not the loop.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class MicroBatch(NamedTuple):
    """One micro-batch on the device: ``model(inputs, targets, **kwargs)`` is its mean loss."""

    inputs: torch.Tensor
    targets: torch.Tensor
    kwargs: dict[str, torch.Tensor]  # doc_ids / positions with document masking, else empty


class Description(NamedTuple):
    """What the run header says about a strategy (:meth:`Strategy.describe`)."""

    strategy: str  # the device line's text after "strategy ": the name, e.g. "fsdp (dp_shard 2 x tp 2)"
    kernels: str = ""  # appended to the kernels line, e.g. "blocks torch.compile'd (inductor)"; "" for nothing


class Strategy(ABC):
    """How a model is placed, wrapped, stepped and checkpointed across processes."""

    name: ClassVar[str]  # the backend's ``parallel.strategy`` value
    compile: bool | str = False  # False, or the torch.compile backend its blocks are compiled with

    def __init__(self, info: DistInfo, precision: str) -> None:
        self.info = info
        self.device = info.device
        self.compute_dtype = resolve_precision(precision, info.device)
        # The dtype of the weights, their gradients and the optimizer state: fp32 master weights under every
        # mixed precision; float64 throughout for train.precision=fp64.
        self.master_dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32

    # -- setup ---------------------------------------------------------------------
    @abstractmethod
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Take a meta-device model; shard/wrap it, materialize and init it, build the optimizer."""

    # -- step ----------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        """Forward and backward over the step's micro-batches, gradients averaged over them (synchronized
        after the last one only); returns this rank's mean loss (detached)."""
        loss_sum: torch.Tensor | None = None  # in the loss's own dtype (fp64 stays fp64)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.no_sync(model) if not last else contextlib.nullcontext():
                with self.autocast():
                    loss = model(batch.inputs, batch.targets, **batch.kwargs)
                self.backward(loss / len(micro_batches))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        assert loss_sum is not None, "a step has at least one micro-batch"
        return loss_sum / len(micro_batches)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op in fp32 and fp64)."""
        if self.compute_dtype == self.master_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Skip gradient synchronization during accumulation micro-steps (no-op by default)."""
        yield

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm (before clipping); clips when max_norm > 0."""

    @abstractmethod
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update and clear gradients."""

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over all ranks (identity for one process). gloo has no AVG, so SUM / world."""
        if self.info.world_size == 1 or not torch.distributed.is_initialized():
            return value
        out = value.detach().clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out / self.info.world_size

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.info.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # -- checkpoint ------------------------------------------------------------------
    # The checkpoint format this backend's state is saved in: "dcp" (torch.distributed.checkpoint,
    # bigtrain.checkpoint.dcp) or "deepspeed" (the engine's own files, bigtrain.checkpoint.deepspeed).
    checkpoint_format = "dcp"

    def load_model_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights with full (unsharded) tensors present on every rank (``model.init_from``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.unwrap(model), dict(weights), options=StateDictOptions(full_state_dict=True))

    def held_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank really holds (local shards only)."""
        from bigtrain.parallel.memory import held_state_bytes

        return held_state_bytes(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model inside any wrapper (for generation and export)."""
        return model

    # -- run header ------------------------------------------------------------------
    def describe(self) -> Description:
        """The run header's words for this backend: its name, and its compiled blocks when ``compile`` is on."""
        if not self.compile:
            return Description(self.name)
        from bigtrain.parallel.apply import compile_backend

        return Description(self.name, f"blocks torch.compile'd ({compile_backend(self.compile)})")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto → bf16 on CUDA devices that support it, fp32 elsewhere."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp64":
        return torch.float64
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_strategy(cfg: ParallelConfig, info: DistInfo, *, precision: str, compile: bool | str,
                   micro_batch_size: int, grad_clip: float, accum_steps: int) -> Strategy:
    """Pick the backend named by ``parallel.strategy`` (each imported only when chosen).

    The values from other sections are passed explicitly: ``compile`` (False, or ``train.compile_backend``
    when ``train.compile`` is on; applied with activation checkpointing by
    :func:`bigtrain.parallel.apply.parallelize`); ``micro_batch_size``, ``grad_clip`` and
    ``accum_steps`` go into ZeRO's DeepSpeed config (DeepSpeed owns the accumulation boundary and
    clipping); FSDP2 uses the first and last to size a pipeline's microbatches; the other backends
    ignore them.
    """
    cfg.check_world_size(info.world_size)
    if cfg.strategy == "single":
        from bigtrain.parallel.single import SingleStrategy

        return SingleStrategy(info, precision, cfg, compile=compile)
    if cfg.strategy == "ddp":
        from bigtrain.parallel.ddp import DDPStrategy

        return DDPStrategy(info, precision, cfg, compile=compile)
    if cfg.strategy == "fsdp":
        from bigtrain.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(info, precision, cfg, compile=compile, micro_batch_size=micro_batch_size,
                            accum_steps=accum_steps)
    if cfg.strategy == "zero":
        from bigtrain.parallel.zero import ZeroStrategy

        return ZeroStrategy(info, precision, cfg, compile=compile, micro_batch_size=micro_batch_size,
                            grad_clip=grad_clip, accum_steps=accum_steps)
    raise ValueError(f"strategy {cfg.strategy!r} is not available in this build")
