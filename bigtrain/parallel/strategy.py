"""The Strategy interface: everything the trainer needs from a parallelism backend.

The trainer calls only these methods, so switching single ↔ DDP ↔ FSDP2 ↔ ZeRO never
touches the loop or the model. Backends live in their own modules; :func:`build_strategy`
picks one from ``parallel.strategy``.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo

if TYPE_CHECKING:
    from bigtrain.train.config import TrainConfig

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """How a model is placed, wrapped, stepped and checkpointed across processes."""

    def __init__(self, info: DistInfo, precision: str) -> None:
        self.info = info
        self.device = info.device
        self.compute_dtype = resolve_precision(precision, info.device)

    # -- setup ---------------------------------------------------------------------
    @abstractmethod
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Take a meta-device model; shard/wrap it, materialize and init it, build the optimizer."""

    # -- step ----------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.compute_dtype == torch.float32:
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
    @abstractmethod
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": ..., "optimizer": ...}: full (unsharded) states, complete at least on rank 0.

        Called on every rank (gathering may be collective). Checkpoints do not use it (they are
        sharded: :meth:`checkpoint_state` / :meth:`save_native`); it is for consumers that want one
        full copy in torch's index-keyed optimizer layout.
        """

    @abstractmethod
    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None: ...

    # Checkpoint files: "dcp" = torch.distributed.checkpoint shards written by every rank from
    # checkpoint_state(); "deepspeed" = the backend's own files (save_native / load_native).
    checkpoint_format = "dcp"

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model", "optimizer"} as this rank holds them (FSDP: DTensor shards; no gathering), keyed by
        parameter name, for torch.distributed.checkpoint. Also the template a resume loads into."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # get_state_dict creates AdamW's lazy state (a zero-gradient, lr=0 step: weights unchanged)
        # so a checkpoint taken before the first step still has every key a later one has.
        msd, osd = get_state_dict(self.unwrap(model), optimizer)
        return {"model": msd, "optimizer": osd}

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Apply a loaded :meth:`checkpoint_state`; the optimizer hyperparameters of this run's config win
        (lr, betas, weight decay may differ from the checkpoint's; the trainer warns about it)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        set_state_dict(self.unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for group, values in zip(optimizer.param_groups, hyper):
            group.update(values)

    def load_model_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights with full (unsharded) tensors present on every rank (``model.init_from``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.unwrap(model), weights, options=StateDictOptions(full_state_dict=True))

    def save_native(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Any, *,
                    staged: bool = False) -> dict[str, Any]:
        """Write the backend's own checkpoint into ``path`` (collective); with ``staged``, only copy it to host
        memory and leave the file writes to :meth:`write_staged`. Returns facts for the manifest."""
        raise NotImplementedError(f"{type(self).__name__} writes checkpoints with torch.distributed.checkpoint")

    def write_staged(self) -> None:
        """Write the files a ``staged`` :meth:`save_native` left in host memory (no collectives; any thread)."""
        raise NotImplementedError(f"{type(self).__name__} writes checkpoints with torch.distributed.checkpoint")

    def load_native(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Any, *, saved_world_size: int,
                    scratch: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} reads checkpoints with torch.distributed.checkpoint")

    def held_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank really holds (local shards only)."""
        from bigtrain.parallel.memory import held_state_bytes

        return held_state_bytes(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model inside any wrapper (for generation and export)."""
        return model


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto → bf16 on CUDA devices that support it, fp32 elsewhere."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_strategy(cfg: ParallelConfig, info: DistInfo, precision: str, *, train: "TrainConfig | None" = None,
                   accum_steps: int = 1) -> Strategy:
    """Pick the backend named by ``parallel.strategy`` (each imported only when chosen).

    ``train.compile`` is applied, with activation checkpointing, by :func:`bigtrain.parallel.apply.parallelize`.
    """
    compile = bool(train.compile) if train is not None else False
    if cfg.strategy == "single":
        if info.world_size > 1:
            from bigtrain.errors import UserError

            raise UserError(
                f"parallel.strategy=single runs one process, but this launch has {info.world_size} processes; "
                f"use parallel.strategy=ddp, fsdp or zero, or launch one process."
            )
        from bigtrain.parallel.single import SingleStrategy

        return SingleStrategy(info, precision, cfg, compile=compile)
    if cfg.strategy == "ddp":
        from bigtrain.parallel.ddp import DDPStrategy

        return DDPStrategy(info, precision, cfg, compile=compile)
    if cfg.strategy == "fsdp":
        from bigtrain.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(info, precision, cfg, compile=compile)
    if cfg.strategy == "zero":
        from bigtrain.parallel.zero import ZeroStrategy
        from bigtrain.train.config import TrainConfig as _TrainConfig

        return ZeroStrategy(info, precision, cfg, train or _TrainConfig(), accum_steps)
    raise ValueError(f"strategy {cfg.strategy!r} is not available in this build")
