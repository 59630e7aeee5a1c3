"""Step-time breakdown: where a training step's wall time goes.

The trainer brackets the phases of a step (``data_wait_s``, ``fwd_bwd_s``, ``optimizer_s``,
``collectives_s``) with :meth:`StepTimer.phase` and adds host-measured stalls
(``checkpoint_stall_s``) with :meth:`StepTimer.add`. On a log step :meth:`StepTimer.summary`
returns each phase's mean seconds per step since the previous log step and starts a new window.

On CPU the phases are ``time.perf_counter`` intervals. On CUDA they are CUDA events recorded on
the current stream, so a non-log step adds no host synchronization (recording an event is
asynchronous); the events are resolved in :meth:`summary`, which runs right after the log step's
loss ``.item()`` has synchronized anyway. Event phases measure the GPU timeline: the gap a phase
spans there includes the time the GPU sat idle waiting for the host (e.g. for the next batch), which
is what "data wait" means on a GPU.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

# The keys of a train record's breakdown, in display order.
PHASES = ("data_wait_s", "fwd_bwd_s", "optimizer_s", "collectives_s", "checkpoint_stall_s")


class StepTimer:
    """Accumulates per-phase time over a window of steps (CUDA events or perf_counter)."""

    MAX_PENDING = 8192  # bound on unresolved events (~2,000 steps of 4 phases)

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self._host: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._pool: list[torch.cuda.Event] = []  # events are reused: creating one per phase per step is wasteful
        self._steps = 0

    def _event(self) -> torch.cuda.Event:
        if self._pool:
            return self._pool.pop()
        return torch.cuda.Event(enable_timing=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name`` (no host sync on CUDA)."""
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = self._event(), self._event()
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
                if len(self._events) >= self.MAX_PENDING:
                    self._drain()  # only when summary() is never called (train_step driven by hand)
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add host-measured seconds to phase ``name`` (e.g. a checkpoint stall)."""
        if self.enabled:
            self._host[name] = self._host.get(name, 0.0) + seconds

    def _drain(self) -> None:
        """Resolve pending CUDA events into seconds (waits for the last one) and recycle them."""
        if not self._events:
            return
        self._events[-1][2].synchronize()
        for name, start, end in self._events:
            self._host[name] = self._host.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self._pool += (start, end)
        self._events = []

    def step_done(self) -> None:
        """Mark the end of one optimizer step (the divisor of :meth:`summary`)."""
        self._steps += 1

    def summary(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last summary; resets the window.

        On CUDA this waits for the window's last event (a host sync): call it on log steps only.
        """
        if not self.enabled:
            return {}
        self._drain()
        totals = self._host
        steps = max(1, self._steps)
        self._host, self._events, self._steps = {}, [], 0
        return {name: totals[name] / steps for name in PHASES if name in totals} | {
            name: value / steps for name, value in totals.items() if name not in PHASES}
