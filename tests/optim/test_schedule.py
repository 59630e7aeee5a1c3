"""LR schedules: warmup, cosine, warmup-stable-decay, constant."""
from __future__ import annotations

import math
from itertools import pairwise

import pytest

from bigtrain.optim.schedule import LRSchedule


def test_linear_warmup() -> None:
    s = LRSchedule("cosine", 1.0, warmup_steps=10, max_steps=100)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)


def test_cosine_midpoint_and_end() -> None:
    s = LRSchedule("cosine", 1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # clamped past the end
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in pairwise(values))


def test_wsd_stable_then_linear_decay() -> None:
    s = LRSchedule("wsd", 2.0, warmup_steps=5, max_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert s(5) == s(50) == s(79) == pytest.approx(2.0)
    assert s(80) == pytest.approx(2.0)
    assert s(90) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.0)


def test_constant_and_no_warmup() -> None:
    s = LRSchedule("constant", 0.5, warmup_steps=0, max_steps=10)
    assert [s(i) for i in range(3)] == [0.5, 0.5, 0.5]
