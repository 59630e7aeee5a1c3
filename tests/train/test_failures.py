"""NonFiniteGuard (train.on_nonfinite), StopRequest (signals) and the no-progress Watchdog, in process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from bigtrain.train.failures import EXIT_RANK_FAILURE, NonFiniteError, NonFiniteGuard
from bigtrain.train.fault_injection import install_loss_poison
from bigtrain.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest

CPU = torch.device("cpu")
NAN, ONE = torch.tensor(float("nan")), torch.tensor(1.0)


def test_stop_policy_reports_the_first_bad_step_only_when_checked() -> None:
    guard = NonFiniteGuard("stop", 5, CPU)
    assert guard.allows_update(1, ONE, ONE)
    assert guard.allows_update(2, ONE, torch.tensor(float("inf")))  # an infinite grad norm counts too
    assert guard.allows_update(3, NAN, NAN)
    with pytest.raises(NonFiniteError, match=r"at step 2 .found before saving"):
        guard.check("before saving a checkpoint")
    fresh = NonFiniteGuard("stop", 5, CPU)
    fresh.allows_update(1, ONE, 0.5)  # a float grad norm (some backends) works too
    fresh.check("at log step 1")


def test_skip_policy_counts_and_stops_after_k_consecutive() -> None:
    guard = NonFiniteGuard("skip", 2, CPU)
    assert guard.allows_update(1, NAN, ONE) is False
    assert guard.allows_update(2, ONE, ONE) is True  # a good step resets the streak
    assert guard.allows_update(3, ONE, NAN) is False
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps .up to step 4"):
        guard.allows_update(4, NAN, NAN)
    assert guard.skipped_steps == 3


def test_poison_only_at_listed_steps() -> None:
    model = torch.nn.Identity()
    step = {"now": 0}
    install_loss_poison(model, [2, 4], lambda: step["now"])
    for now, poisoned in [(2, True), (3, False), (4, True)]:
        step["now"] = now
        assert bool(torch.isnan(model(ONE))) is poisoned


def test_stop_request_records_signals_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest(world_size=1) as stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert stop.agreed() == signal.SIGUSR1 and stop.name(stop.agreed()) == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    assert StopRequest.exit_status(signal.SIGUSR1) == StopRequest.exit_status(signal.SIGTERM) == EXIT_PREEMPTED == 75
    assert StopRequest.exit_status(signal.SIGINT) == EXIT_INTERRUPTED == 130


def test_second_ctrl_c_interrupts_at_once() -> None:
    with StopRequest(world_size=1) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_watchdog_dumps_stacks_and_exits_when_steps_stop() -> None:
    code = ("import time\nfrom bigtrain.train.failures import Watchdog\n"
            "with Watchdog(0.5, rank=1, world_size=2, poll_s=0.1) as w:\n"
            "    w.beat(7)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_RANK_FAILURE, proc.stderr
    assert "rank 1 of 2" in proc.stderr and "after step 7" in proc.stderr
    # faulthandler's stack of the main thread
    assert "time.sleep(30)" in proc.stderr or 'File "<string>"' in proc.stderr
