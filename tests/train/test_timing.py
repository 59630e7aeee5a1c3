"""The step-time breakdown timer (CPU perf_counter path; the CUDA-event path when a GPU is present)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bigtrain.train import timing
from bigtrain.train.timing import PHASES, StepTimer


def test_cpu_phases_are_averaged_per_step_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: sleeping on a busy 2-core CI machine overshoots by unpredictable amounts.
    now = [100.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def spend(seconds: float) -> None:
        now[0] += seconds

    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.phase("data_wait_s"):
            spend(0.01)
        with timer.phase("fwd_bwd_s"):
            spend(0.03)
        timer.step_done()
    timer.add("checkpoint_stall_s", 0.06)  # one stall of 60 ms in a 3-step window = 20 ms per step
    out = timer.summary()
    assert list(out) == ["data_wait_s", "fwd_bwd_s", "checkpoint_stall_s"]  # display order of PHASES
    # Means per step, not sums (sums would be 0.03 and 0.09).
    assert out["data_wait_s"] == pytest.approx(0.01)
    assert out["fwd_bwd_s"] == pytest.approx(0.03)
    assert out["checkpoint_stall_s"] == pytest.approx(0.02)
    # The next window starts empty.
    with timer.phase("optimizer_s"):
        pass
    timer.step_done()
    assert set(timer.summary()) == {"optimizer_s"}


def test_phase_time_is_recorded_when_the_body_raises() -> None:
    timer = StepTimer(torch.device("cpu"))
    with pytest.raises(RuntimeError), timer.phase("fwd_bwd_s"):
        raise RuntimeError("boom")
    timer.step_done()
    assert "fwd_bwd_s" in timer.summary()


def test_disabled_timer_records_nothing() -> None:
    timer = StepTimer(torch.device("cpu"), enabled=False)
    with timer.phase("fwd_bwd_s"):
        pass
    timer.add("checkpoint_stall_s", 1.0)
    timer.step_done()
    assert timer.summary() == {}


def test_unknown_phase_names_are_kept_after_the_known_ones() -> None:
    timer = StepTimer(torch.device("cpu"))
    timer.add("zzz_s", 2.0)
    timer.add("data_wait_s", 1.0)
    timer.step_done()
    timer.step_done()
    assert list(timer.summary().items()) == [("data_wait_s", 0.5), ("zzz_s", 1.0)]
    assert "collectives_s" in PHASES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-event path needs a GPU")
def test_cuda_events_measure_gpu_work_without_per_step_sync() -> None:
    timer = StepTimer(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(4):
        with timer.phase("fwd_bwd_s"):
            for _ in range(10):
                x = torch.tanh(x @ x) / 2048
        timer.step_done()
    assert timer._events, "events stay unresolved until summary() (no host sync per step)"
    out = timer.summary()
    assert out["fwd_bwd_s"] > 0
    assert not timer._events and len(timer._pool) == 8  # events are recycled
