"""Graceful stop on SIGUSR1 / SIGTERM / SIGINT: finish the step, agree, checkpoint, exit 75.

Clusters warn a job before killing it: Slurm sends SIGUSR1 ``--signal=USR1@<seconds>`` before the
time limit and SIGTERM on preemption or ``scancel``; a person presses Ctrl-C (SIGINT). The handler
only records the signal and when it arrived (printing from a signal handler can deadlock on the
stream lock it interrupted); the loop reports it (:meth:`StopRequest.describe`). At the next step
boundary every rank contributes its flag to one
all-reduce (MAX), so all ranks stop after the *same* step even when only some of them were
signalled, then the trainer saves a checkpoint and the CLI exits with :data:`EXIT_PREEMPTED`.

Cost: one all-reduce of a 4-byte CPU tensor per step (gloo). On NCCL runs it goes through a
separate gloo group, so it never waits for the GPU stream (no host-device sync); on one process
there is no collective at all. A second Ctrl-C interrupts at once (KeyboardInterrupt).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# Distinct exit statuses, documented in launch/README.md (the sbatch script requeues on 75).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — stopped by SIGUSR1/SIGTERM after saving a checkpoint
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C after saving a checkpoint
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records stop signals; :meth:`agreed` turns them into one decision shared by all ranks.

    Use as a context manager around the training loop: handlers are installed on enter and the
    previous ones restored on exit (only from the main thread, where Python delivers signals).
    """

    def __init__(self, world_size: int, *, backend: str = "gloo") -> None:
        self.world_size = world_size
        self.signum = 0  # the first stop signal received by this process (0 = none)
        self.received_at = 0.0  # its wall-clock time (time.time())
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        if world_size > 1 and dist.is_initialized() and backend != "gloo":
            # A CPU side-channel: an all-reduce on the NCCL group would sync the host with the GPU every step.
            self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ handlers
    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        if not self.signum:
            self.signum, self.received_at = signum, time.time()
            _acknowledge(signum)



    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop from code (tests, hooks), as if ``signum`` had arrived."""
        if not self.signum:
            self.signum, self.received_at = signum, time.time()

    def describe(self) -> str:
        """What this process received and when, for the log ("" when nothing was received here)."""
        if not self.signum:
            return ""
        at = time.strftime("%H:%M:%S", time.localtime(self.received_at))
        return f"received {self.name(self.signum)} at {at} ({time.time() - self.received_at:.1f}s ago)"

    # ------------------------------------------------------------------ agreement
    def agreed(self) -> int:
        """The stop signal agreed by all ranks (0 = keep training). Collective: call on every rank."""
        if self.world_size == 1 or not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.tolist()[0])  # a CPU tensor: no device sync

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name if signum else ""

    @staticmethod
    def exit_status(signum: int) -> int:
        """75 for SIGUSR1/SIGTERM (requeue me), 130 for Ctrl-C."""
        return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


def _acknowledge(signum: int) -> None:
    """Say at once that the signal was heard (the step may take a while). One raw write(2) on stderr, from the
    process of global rank 0 only: it takes no Python stream lock, so it cannot deadlock the interrupted code."""
    if os.environ.get("RANK", "0") != "0":
        return
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    again = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
    with contextlib.suppress(OSError):
        os.write(2, f"\nbigtrain: {what}: stopping after this step and saving a checkpoint{again}\n".encode())
