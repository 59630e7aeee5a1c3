"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

- ``cosine``: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``.
- ``wsd``: warmup-stable-decay: linear warmup, constant, then a linear decay over the last
  ``decay_fraction`` of training to ``min_lr_ratio * lr``.
- ``constant``: linear warmup, then constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["cosine", "wsd", "constant"]


@dataclass(frozen=True)
class LRSchedule:
    kind: ScheduleKind
    lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = max(1, self.max_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return min_lr + 0.5 * (self.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.max_steps))
            decay_start = self.max_steps - decay_steps
            if step < decay_start:
                return self.lr
            progress = min(1.0, (step - decay_start) / decay_steps)
            return self.lr + (min_lr - self.lr) * progress
        raise ValueError(f"unknown schedule {self.kind!r}")
