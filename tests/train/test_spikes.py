"""Loss-spike policy (``train.on_spike``): the window statistics, the decision and its two ways of
skipping (on the host; inside a fused AdamW on the device, with no host sync), an injected spike on
one rank and on two, resume deciding exactly as the straight run, and bad keys.

``train.debug_spike_steps`` multiplies the loss by 1000 at the listed steps (a testing aid).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain import messages
from bigtrain.train.spikes import SpikeGuard, SpikeWindow, skips_on_device
from tests.helpers import REPO, build_trainer, cli, record_host_syncs, run_distributed, train_records

CPU = torch.device("cpu")
WINDOW = 4
# A tiny run: the window (4 steps) is full after step 4; step 7 gets a spike; step 6 is checkpointed.
TINY = ["train.optimizer=adamw", "model.num_layers=2", "model.dim=64", "model.num_heads=2", "model.num_kv_heads=2",
        "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1",
        "train.precision=fp32", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "run.device=cpu", "run.num_threads=1", "log.every_steps=1", "train.max_steps=8", "checkpoint.at_end=false",
        "train.on_spike=skip", f"train.spike_window={WINDOW}", "train.debug_spike_steps=[7]"]


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _fit(out: Path, *overrides: str) -> tuple[Any, list[str]]:
    """Train in this process; returns (the trainer, for its optimizer and guard, the messages printed)."""
    threads = torch.get_num_threads()
    trainer = None
    try:
        with messages.capture() as lines:
            trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out}", *overrides, "log.console=false"])
            trainer.fit()
    finally:
        if trainer is not None:
            trainer.loader.close()
        torch.set_num_threads(threads)
    return trainer, lines


def _adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    return {float(s["step"]) for s in optimizer.state.values()}


# ---------------------------------------------------------------------------------------------- units
def test_window_statistics_are_the_sample_mean_and_std_of_the_accepted_steps() -> None:
    window = SpikeWindow(3, 6.0, CPU)
    yes, no = torch.tensor(True), torch.tensor(False)
    for loss, norm in [(1.0, 10.0), (2.0, 20.0)]:
        window.push(torch.tensor([loss, norm], dtype=torch.float64), yes)
    assert not window.full()
    window.push(torch.tensor([99.0, 99.0], dtype=torch.float64), no)  # rejected: never enters
    window.push(torch.tensor([4.0, 30.0], dtype=torch.float64), yes)
    assert window.full()
    z = window.z_scores(torch.tensor([5.0, 20.0], dtype=torch.float64))
    losses, norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), torch.tensor([10.0, 20.0, 30.0],
                                                                                      dtype=torch.float64)
    want = torch.stack([(5.0 - losses.mean()) / losses.std(), (20.0 - norms.mean()) / norms.std()])
    assert torch.equal(z, want)
    window.push(torch.tensor([8.0, 40.0], dtype=torch.float64), yes)  # the oldest (1, 10) leaves
    assert window.values.tolist() == [[2.0, 4.0, 8.0], [20.0, 30.0, 40.0]]
    flat = SpikeWindow(2, 6.0, CPU)  # a constant window: above its mean is infinitely far, at it is 0
    for _ in range(2):
        flat.push(torch.tensor([1.0, 1.0], dtype=torch.float64), yes)
    assert flat.z_scores(torch.tensor([1.5, 1.0], dtype=torch.float64)).tolist() == [float("inf"), 0.0]
    with pytest.raises(ValueError):
        SpikeWindow(1, 6.0, CPU)


def test_guard_skips_spikes_after_warm_up_on_the_host_and_leaves_nan_to_on_nonfinite() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # cannot skip on the device
    assert not skips_on_device(sgd)
    guard = SpikeGuard("skip", 3, 6.0, CPU)

    def decide(step: int, loss: float, norm: float = 1.0) -> bool:
        return guard.allows_update(step, _t(loss), _t(norm), sgd)

    with messages.capture() as lines:
        assert decide(1, 100.0) and decide(2, 2.0, 1.1)  # warm-up: nothing is judged, even a jump
        assert guard.record(2) == {"spike_skips": 0, "spike_z": None}
        assert decide(3, 2.1, 0.9)  # window full now: [100, 2, 2.1]
        assert not decide(4, 1e6)  # loss spike
        assert not decide(5, 2.0, 1e6)  # grad-norm spike
        assert decide(6, float("nan"))  # not a spike: on_nonfinite's business, and it never enters the window
        assert guard.window.values[0].tolist() == [100.0, 2.0, 2.1]
        record = guard.record(6)
    assert record["spike_skips"] == 2 and record["spike_z"] > 1e3
    assert len(lines) == 2 and lines[0].startswith("bigtrain: step 4: loss spike, update skipped (z-score ")
    assert lines[1].endswith("over the last 3 steps; 2 in total)")
    assert guard.record(7)["spike_z"] is None  # reset at each record; nothing judged since
    assert SpikeGuard("off", 3, 6.0, CPU).record(1) == {}


def test_a_spike_as_long_as_the_window_is_a_new_level() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    guard = SpikeGuard("skip", 3, 6.0, CPU)
    with messages.capture():
        decisions = [guard.allows_update(s, _t(loss), _t(1.0 + s / 100), sgd)
                     for s, loss in enumerate([2.0, 2.1, 2.0, 9.0, 9.0, 9.0, 9.1, 9.0, 9.1, 9.0], start=1)]
    # 3 skips in a row restart the window, which warms up on the new level (steps 7-9) and judges step 10.
    assert decisions == [True] * 3 + [False] * 3 + [True] * 4
    assert guard.window.values[0].tolist() == [9.0, 9.1, 9.0]
    assert int(guard.skipped) == 3 and int(guard.window.count) == 4


def test_fused_adamw_skips_exactly_on_the_device_and_state_round_trips() -> None:
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert skips_on_device(opt)
    guard = SpikeGuard("skip", 2, 6.0, CPU)

    def step(n: int, loss: float) -> None:
        param.grad = torch.full_like(param, float(n))
        assert guard.allows_update(n, _t(loss), _t(1.0 + n / 10), opt)  # the device decides: always "apply"
        opt.step()

    for n, loss in enumerate([2.0, 2.1, 2.05], start=1):
        step(n, loss)
    saved = guard.state_dict()
    before = (param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()})
    with messages.capture() as lines:
        step(4, 500.0)
        assert torch.equal(param, before[0])  # parameters, both moments and the step count untouched
        assert all(torch.equal(v, before[1][k]) for k, v in opt.state[param].items())
        step(5, 2.0)
        assert float(opt.state[param]["step"]) == 4.0 and not torch.equal(param, before[0])
        assert guard.record(5)["spike_skips"] == 1
    assert len(lines) == 1 and "1 update(s) skipped as loss spikes up to step 5" in lines[0]  # said at the log
    again = SpikeGuard("skip", 2, 6.0, CPU)
    again.load_state_dict({k: v.clone() for k, v in saved.items()})
    assert torch.equal(again.window.values, saved["values"]) and int(again.window.count) == 3
    with messages.capture() as warned:
        SpikeGuard("skip", 5, 6.0, CPU).load_state_dict(saved)  # another window size: warm up again
    assert "spike_window changed from 2 to 5" in warned[0]


# ---------------------------------------------------------------------------------------------- runs
def test_injected_spike_is_skipped_logged_and_resume_decides_as_the_straight_run(tmp_path: Path,
                                                                               demo_data: Path) -> None:
    straight, lines = _fit(tmp_path / "straight", *TINY, "checkpoint.every_steps=6", "checkpoint.keep_last=5")
    records = {r["step"]: r for r in train_records(tmp_path / "straight")}
    assert [records[s]["spike_skips"] for s in range(1, 9)] == [0] * 6 + [1, 1]
    assert [records[s]["spike_z"] is None for s in range(1, 9)] == [True] * 4 + [False] * 4  # warm-up: 4 steps
    assert records[7]["spike_z"] > 6 and records[8]["spike_z"] < 6
    assert any(line.startswith("bigtrain: step 7: loss spike, update skipped") for line in lines), lines
    assert _adam_steps(straight.optimizer) == {7.0}  # 8 steps, one update skipped (AdamW's count did not move)

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    (resumed_dir / "metrics.jsonl").write_text("")
    resumed, _ = _fit(resumed_dir, *TINY, "checkpoint.every_steps=6", "checkpoint.keep_last=5",
                      f"checkpoint.resume={resumed_dir / 'checkpoints' / 'step_000006'}")
    again = {r["step"]: r for r in train_records(resumed_dir)}
    keys = ("loss", "grad_norm", "spike_skips", "spike_z")
    assert sorted(again) == [7, 8]
    assert [[again[s][k] for k in keys] for s in (7, 8)] == [[records[s][k] for k in keys] for s in (7, 8)]
    assert torch.equal(resumed.spikes.window.values, straight.spikes.window.values)
    assert _adam_steps(resumed.optimizer) == {7.0}


def _two_rank_run(rank: int, root: str) -> dict[str, Any]:
    trainer, _ = _fit(Path(root) / "run", *TINY, "parallel.strategy=ddp", "checkpoint.every_steps=0")
    return {"skipped": int(trainer.spikes.skipped), "window": trainer.spikes.window.values.tolist(),
            "adam_steps": _adam_steps(trainer.optimizer),
            "records": [(r["step"], r["spike_skips"]) for r in train_records(Path(root) / "run")] if rank == 0 else []}


def test_every_rank_skips_the_same_spike(tmp_path: Path, demo_data: Path) -> None:
    first, second = run_distributed(_two_rank_run, 2, str(tmp_path), timeout_s=240)
    assert first["skipped"] == second["skipped"] == 1
    assert first["window"] == second["window"] and first["adam_steps"] == second["adam_steps"] == {7.0}
    assert first["records"][5:] == [(6, 0), (7, 1), (8, 1)]


def test_device_side_skip_needs_no_host_sync_on_non_log_steps(tmp_path: Path, demo_data: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fused AdamW (CUDA's; forced here on the CPU) the decision never leaves the device."""
    import bigtrain.optim.optimizer as optimizer_module

    monkeypatch.setattr(optimizer_module, "adamw_kwargs", lambda params, device_type=None: {"fused": True})
    steps_to_log = ("log.every_steps=4",)  # log steps 1, 4 and 8
    with messages.capture():
        trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={tmp_path / 'run'}", *TINY, *steps_to_log,
                                                       "log.console=false", "checkpoint.every_steps=0"])
    assert skips_on_device(trainer.optimizer)
    syncs = record_host_syncs(trainer, monkeypatch)
    try:
        with messages.capture() as lines:
            trainer.fit()
    finally:
        monkeypatch.undo()
        trainer.loader.close()
    assert set(syncs) - {0} <= {1, 4, 8}, dict(syncs)
    assert _adam_steps(trainer.optimizer) == {7.0}  # the spike at step 7 was skipped inside the kernel
    assert any("1 update(s) skipped as loss spikes up to step 8" in line for line in lines), lines
    assert train_records(tmp_path / "run")[-1]["spike_skips"] == 1


@pytest.mark.parametrize("override, needle", [
    ("train.spike_window=1", "train.spike_window: must be >= 2"),
    ("train.spike_sigma=0", "train.spike_sigma: must be > 0"),
    ("train.on_spike=sometimes", "on_spike"),
    ("train.debug_spike_steps=[0]", "train.debug_spike_steps"),
])
def test_bad_spike_settings_are_config_errors(override: str, needle: str) -> None:
    from bigtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(REPO / "configs/debug.yaml", [override])


def test_spike_skip_with_zero_exits_2() -> None:
    proc = cli("config", "show", "configs/debug.yaml", "train.on_spike=skip", "parallel.strategy=zero",
               "train.optimizer=adamw")
    assert proc.returncode == 2 and "train.on_spike" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
