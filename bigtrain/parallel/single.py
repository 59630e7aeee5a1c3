"""One process, one device: the reference backend every other backend must match."""
from __future__ import annotations

import torch
from torch import nn

from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.grads import clip_grad_norm_
from bigtrain.parallel.strategy import OptimizerFactory, Strategy


class SingleStrategy(Strategy):
    name = "single"

    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig | None = None, *,
                 compile: bool | str = False) -> None:
        super().__init__(info, precision)
        self.cfg = cfg or ParallelConfig()
        self.compile = compile

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        parallelize(model, self.cfg, compile=self.compile)
        model.to_empty(device=self.device)
        model.init_weights(seed)  # type: ignore[operator]  # a Decoder, typed as the nn.Module it is wrapped as
        return model, make_optimizer(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model.parameters(), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
