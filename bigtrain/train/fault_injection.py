"""Testing aids that inject faults into a real run, kept out of the training step.

``train.debug_poison_steps`` (a documented testing aid, never for real runs) makes the loss NaN at the
listed optimizer steps, so tests can exercise ``train.on_nonfinite`` end to end, also through the CLI
and on several ranks. It is a forward hook on the model, installed only when the list is non-empty:
the step itself has no fault-injection code in it. (Checkpoint commits have their own kill points,
``BIGTRAIN_CHECKPOINT_KILL_AT`` in :mod:`bigtrain.checkpoint.manager`.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def install_loss_poison(model: nn.Module, steps: Sequence[int],
                        current_step: Callable[[], int]) -> RemovableHandle | None:
    """Multiply the training loss by NaN while ``current_step()`` (the 1-based step being computed) is in
    ``steps``. ``model`` is the plain decoder (its forward returns the loss when given targets)."""
    poisoned = frozenset(steps)
    if not poisoned:
        return None

    def poison(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if module.training and current_step() in poisoned:
            return output * float("nan")
        return output

    return model.register_forward_hook(poison)
