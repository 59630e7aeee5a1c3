"""Failure handling in the loop: non-finite loss/grad-norm policy and the no-progress watchdog.

Non-finite policy (``train.on_nonfinite``), all of it in :class:`NonFiniteGuard`; the trainer makes
one call per step, :meth:`NonFiniteGuard.allows_update`, after clipping and before the optimizer step:

* ``stop`` (default) — no host sync per step. Each step folds "loss and grad norm are finite"
  into a device flag (a few tiny kernels, no ``.item()``) and the update is applied;
  :meth:`NonFiniteGuard.check` reads the flag on log steps and always before a checkpoint is
  written, and raises :class:`NonFiniteError`, so a poisoned state is never saved. The CLI exits
  with :data:`EXIT_NONFINITE`. Steps between the bad one and the check still run (on NaN
  weights); they are discarded with the run.
* ``skip`` — the decision must be taken before the optimizer step, so every step reads the
  (global) loss and grad norm on the host: one device sync per step, which costs throughput on
  GPUs (the CPU cannot queue the next step's kernels while it waits). A bad step is dropped
  (no optimizer update; data, LR schedule and step counter move on) and counted;
  ``train.max_consecutive_skips`` bad steps in a row raise :class:`NonFiniteError`. The skip
  counters are not checkpointed: a resumed run counts from zero.

Both read values that are identical on every rank (the all-reduced loss, the global grad
norm), so all ranks decide the same without another collective.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import torch

from bigtrain import messages

EXIT_NONFINITE = 3  # stopped on a non-finite loss or grad norm (no checkpoint written after it)
EXIT_RANK_FAILURE = 4  # this rank made no progress for parallel.timeout_s (a peer died or hangs)


class NonFiniteError(Exception):
    """Training produced a non-finite loss or gradient norm and the policy says stop."""


class NonFiniteGuard:
    """Applies ``train.on_nonfinite`` to each step's (global) loss and grad norm."""

    def __init__(self, policy: str, max_consecutive_skips: int, device: torch.device) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"unknown non-finite policy {policy!r}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0  # total over this process's run (skip policy)
        self.consecutive = 0
        # First step (1-based) with a non-finite value since the run started; 0 = none. Stays on device.
        self._first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._pending: tuple[int, torch.Tensor, torch.Tensor | float] | None = None

    def _fold_pending(self) -> None:
        """Fold the last recorded step into the first-bad-step flag (device ops only, no host sync)."""
        if self._pending is None:
            return
        step, loss, grad_norm = self._pending
        self._pending = None
        bad = ~self._finite(loss, grad_norm)
        self._first_bad = torch.where(bad & (self._first_bad == 0), torch.full_like(self._first_bad, step),
                                      self._first_bad)

    @staticmethod
    def _finite(loss: torch.Tensor, grad_norm: torch.Tensor | float) -> torch.Tensor:
        norm = torch.as_tensor(grad_norm, device=loss.device)
        return torch.isfinite(loss) & torch.isfinite(norm)

    def allows_update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> bool:
        """The whole policy for step ``step`` (1-based): True = apply the optimizer update.

        ``stop`` records the values on device and always returns True (no host sync); ``skip``
        reads them on the host and returns False for a non-finite step.
        """
        if self.policy == "stop":
            # Folded into the device flag later (next call or check): ZeRO fills its grad-norm tensor
            # inside the optimizer step, which runs after this call.
            self._fold_pending()
            self._pending = (step, loss, grad_norm)
            return True
        if bool(self._finite(loss, grad_norm).tolist()):
            self.consecutive = 0
            return True
        self.skipped_steps += 1
        self.consecutive += 1
        messages.say(f"bigtrain: step {step}: non-finite loss or gradient norm, update skipped "
                     f"({self.consecutive} in a row, {self.skipped_steps} in total)")
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient norm "
                f"(train.max_consecutive_skips={self.max_consecutive_skips}); stopping. Lower train.lr, check the "
                f"data, or resume from the last checkpoint.")
        return False

    def check(self, where: str) -> None:
        """``stop`` policy: raise :class:`NonFiniteError` if any step so far was non-finite (one host sync).
        A no-op under ``skip`` (bad steps were never applied)."""
        if self.policy != "stop":
            return
        self._fold_pending()
        first = int(self._first_bad.item())  # the one host sync
        if first:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {first} (found {where}); stopping without saving a "
                f"checkpoint, so the newest checkpoint is still a good one. Lower train.lr, raise "
                f"train.lr_warmup_steps, check the data, or set train.on_nonfinite=skip to drop such steps.")


class Watchdog:
    """Exits this rank with a stack dump when no step finishes for ``timeout_s`` seconds.

    Collectives already fail after ``parallel.timeout_s`` when a peer is gone, but a rank can also
    hang outside any collective (a stuck data read, a deadlock). Armed by the first :meth:`beat`
    (so compilation in step 1 does not count) and suspended around evaluation and checkpoint
    saves, whose collectives have their own timeout. A daemon thread, so it costs nothing per step.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int, *, poll_s: float = 1.0) -> None:
        self.timeout_s, self.rank, self.world_size, self.poll_s = timeout_s, rank, world_size, poll_s
        self._last: float | None = None
        self._step = 0
        self._paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bigtrain-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self, step: int) -> None:
        self._last, self._step = time.monotonic(), step

    def disarm(self) -> None:
        """No more steps to watch (until the next :meth:`beat`)."""
        self._last = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._last is None or self._paused:
                continue
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                messages.warn(f"bigtrain: rank {self.rank} of {self.world_size} on {socket.gethostname()} "
                              f"(pid {os.getpid()}): no training step finished for {idle:.0f}s after step {self._step} "
                              f"(parallel.timeout_s={self.timeout_s:g}); another rank probably died or hangs.",
                              every_rank=True)
                _print_peers(self.rank, self.world_size)
                messages.warn("Stacks of this rank's threads:", every_rank=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_RANK_FAILURE)


def report_rank_failure(exc: BaseException) -> None:
    """One line naming this rank before the traceback, so a multi-rank log says who failed and why.

    A collective that fails because a peer died (gloo: "Connection closed by peer", NCCL: a
    watchdog abort) or timed out lands here on every surviving rank.
    """
    rank, world = messages.rank(), messages.world_size()
    if world <= 1:
        return
    text = " ".join(str(exc).split())[:500]
    hint = ""
    if any(word in text.lower() for word in ("timed out", "timeout", "connection", "peer", "closed", "broken pipe")):
        hint = " (a collective failed: another rank probably died or hangs; its own log says why)"
    messages.warn(f"bigtrain: rank {rank} of {world} on {socket.gethostname()} (pid {os.getpid()}) failed: "
                  f"{type(exc).__name__}: {text}{hint}", every_rank=True)
    if hint:
        _print_peers(rank, world)


def _print_peers(rank: int, world: int) -> None:
    """Name the peers that went silent (train/peers.py); takes a few heartbeat intervals."""
    from bigtrain.train.peers import describe_current_peers

    for line in describe_current_peers():
        messages.warn(f"bigtrain: rank {rank} of {world}: {line}", every_rank=True)
