"""One process, one device: the reference backend every other backend must match."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bigtrain.parallel.strategy import OptimizerFactory, Strategy


class SingleStrategy(Strategy):
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to_empty(device=self.device)
        model.init_weights(seed)  # type: ignore[operator]
        return model, make_optimizer(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if hasattr(
            torch.nn.utils, "get_total_norm") else torch.nn.utils.clip_grad_norm_(params, float("inf"))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
