"""Testing aids that inject faults into a real run, kept out of the training step.

``train.debug_poison_steps`` (a documented testing aid, never for real runs) makes the loss NaN at the
listed optimizer steps, so tests can exercise ``train.on_nonfinite`` end to end, also through the CLI
and on several ranks; ``train.debug_spike_steps`` multiplies it by a large finite factor instead, for
``train.on_spike``. It is a forward hook on the model, installed only when the list is non-empty:
the step itself has no fault-injection code in it. (Checkpoint commits have their own kill points,
``BIGTRAIN_CHECKPOINT_KILL_AT`` in :mod:`bigtrain.checkpoint.manager`.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

SPIKE_FACTOR = 1000.0  # far beyond any plausible spike_sigma over a real window (loss and grad norm both jump)


def install_loss_poison(model: nn.Module, steps: Sequence[int],
                        current_step: Callable[[], int]) -> RemovableHandle | None:
    """Multiply the training loss by NaN while ``current_step()`` (the 1-based step being computed) is in
    ``steps``. ``model`` is the plain decoder (its forward returns the loss when given targets)."""
    return _scale_loss(model, steps, float("nan"), current_step)


def install_loss_spike(model: nn.Module, steps: Sequence[int],
                       current_step: Callable[[], int]) -> RemovableHandle | None:
    """``train.debug_spike_steps``: multiply the training loss (hence its gradients) by :data:`SPIKE_FACTOR`
    at ``steps``: a finite spike for ``train.on_spike``."""
    return _scale_loss(model, steps, SPIKE_FACTOR, current_step)


def _scale_loss(model: nn.Module, steps: Sequence[int], factor: float,
                current_step: Callable[[], int]) -> RemovableHandle | None:
    chosen = frozenset(steps)
    if not chosen:
        return None

    def scale(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if module.training and current_step() in chosen:
            return output * factor
        return output

    return model.register_forward_hook(scale)
