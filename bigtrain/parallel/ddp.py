"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigtrain.parallel import dist
from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.single import SingleStrategy
from bigtrain.parallel.strategy import OptimizerFactory


class DDPStrategy(SingleStrategy):
    """Replicated model and optimizer; the step math is the single-process one on averaged gradients."""

    name = "ddp"

    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig, *, compile: bool | str = False) -> None:
        super().__init__(info, precision, cfg, compile=compile)

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        dist.ensure_process_group(self.info, dist.resolve_backend(self.cfg.backend, self.device), self.cfg.timeout_s)
        parallelize(model, self.cfg, compile=self.compile)
        model.to_empty(device=self.device)
        model.init_weights(seed)  # type: ignore[operator]  # a Decoder, typed as the nn.Module it is wrapped as
        ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True, **_no_buffer_sync_per_forward(),  # type: ignore[arg-type]  # a bool flag whose name depends on the torch version
        )
        return ddp, make_optimizer(model)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        with model.no_sync():  # type: ignore[operator]  # the DistributedDataParallel wrap() returned
            yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return super().clip_grad_norm(self.unwrap(model), max_norm)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model


def _no_buffer_sync_per_forward() -> dict[str, bool]:
    """The only buffers (rotary tables) are derived and equal on every rank: never broadcast them per forward.

    torch 2.13 renamed `broadcast_buffers` to `forward_sync_buffers` (and warns on the old name);
    torch 2.11, our GPU image, knows only the old one.
    """
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
