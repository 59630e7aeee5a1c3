"""The pieces the training step delegates to: the non-finite policy, the loss-poison test hook, the
stop-signal report, the one message path, and the fp16 decision (refused outside ZeRO)."""
from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

from bigtrain import messages
from bigtrain.config import load_config
from bigtrain.errors import UserError
from bigtrain.train.failures import NonFiniteError, NonFiniteGuard
from bigtrain.train.fault_injection import install_loss_poison
from bigtrain.train.signals import StopRequest

NAN = float("nan")


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


def test_stop_policy_always_updates_and_reports_the_first_bad_step_later() -> None:
    guard = NonFiniteGuard("stop", 5, torch.device("cpu"))
    assert guard.allows_update(1, _t(2.0), _t(1.0))
    guard.check("at step 1")  # all finite so far
    assert guard.allows_update(2, _t(NAN), _t(1.0))  # stop never drops an update...
    assert guard.allows_update(3, _t(1.0), _t(float("inf")))
    with pytest.raises(NonFiniteError, match="at step 2"):  # ...it stops at the next check, naming the first
        guard.check("at log step 3")


def test_stop_policy_reads_a_grad_norm_filled_in_after_the_decision() -> None:
    """ZeRO fills its grad-norm tensor inside the optimizer step, after allows_update ran."""
    guard = NonFiniteGuard("stop", 5, torch.device("cpu"))
    norm = torch.full((), NAN)  # placeholder, as ZeroStrategy.clip_grad_norm returns
    assert guard.allows_update(1, _t(1.0), norm)
    norm.fill_(0.5)  # the step fills it
    guard.check("after step 1")  # finite: no error
    late_bad = torch.full((), NAN)
    guard.allows_update(2, _t(1.0), late_bad)
    late_bad.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="at step 2"):
        guard.check("after step 2")


def test_skip_policy_drops_bad_updates_counts_them_and_stops_after_too_many() -> None:
    guard = NonFiniteGuard("skip", 2, torch.device("cpu"))
    with messages.capture() as lines:
        assert guard.allows_update(1, _t(1.0), _t(1.0))
        assert not guard.allows_update(2, _t(NAN), _t(1.0))
        assert guard.allows_update(3, _t(1.0), _t(1.0))  # a good step resets the run of skips
        assert not guard.allows_update(4, _t(1.0), _t(NAN))
        with pytest.raises(NonFiniteError, match="2 consecutive steps"):
            guard.allows_update(5, _t(NAN), _t(NAN))
    assert guard.skipped_steps == 3
    assert lines[0] == "bigtrain: step 2: non-finite loss or gradient norm, update skipped (1 in a row, 1 in total)"
    guard.check("anywhere")  # a no-op under skip: bad updates were never applied


class _LossModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_loss_poison_hook_hits_only_the_listed_training_steps() -> None:
    model = _LossModel()
    step = {"now": 1}
    handle = install_loss_poison(model, [2], lambda: step["now"])
    assert handle is not None
    x = torch.ones(3)
    assert model(x).item() == 3.0
    step["now"] = 2
    assert torch.isnan(model(x))
    model.eval()
    assert model(x).item() == 3.0  # evaluation is never poisoned
    handle.remove()
    assert install_loss_poison(model, [], lambda: 1) is None  # nothing installed without steps


def test_a_signal_is_recorded_by_the_handler_and_described_by_the_loop() -> None:
    stop = StopRequest(world_size=1)
    assert stop.describe() == "" and stop.agreed() == 0
    with messages.capture() as lines:
        stop._handle(signal.SIGUSR1, None)  # what Python calls on delivery
    assert lines == []  # the handler prints nothing
    assert stop.agreed() == signal.SIGUSR1
    assert stop.describe().startswith("received SIGUSR1 at ")
    stop._handle(signal.SIGTERM, None)  # the first signal wins
    assert stop.describe().startswith("received SIGUSR1")


def test_messages_print_once_per_launch_unless_every_rank(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        messages.set_rank(1, 2)
        messages.say("from rank 1")
        messages.warn("warning from rank 1")
        messages.warn(f"{messages.rank_label()}: only I know this", every_rank=True)
        messages.set_rank(0, 2)
        messages.say("from rank 0")
    finally:
        messages.set_rank(0, 1)
    out, err = capsys.readouterr()
    assert out == "from rank 0\n"
    assert err == "rank 1 of 2: only I know this\n"


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_fp16_is_refused_outside_zero_naming_bf16(strategy: str) -> None:
    with pytest.raises(UserError, match=r"train\.precision=bf16") as info:
        load_config("configs/debug.yaml", ["train.precision=fp16", f"parallel.strategy={strategy}"])
    assert "parallel.strategy=zero" in str(info.value)


def test_fp16_is_accepted_with_zero_and_bf16_everywhere() -> None:
    assert load_config("configs/debug.yaml", ["train.precision=fp16", "parallel.strategy=zero",
                                               "train.optimizer=adamw"]).train.precision == "fp16"
    for strategy in ("single", "ddp", "fsdp", "zero"):
        load_config("configs/debug.yaml", ["train.precision=bf16", f"parallel.strategy={strategy}",
                                           "train.optimizer=adamw"])
