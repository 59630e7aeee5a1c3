"""No host-device sync inside the training step: ``.item()`` (and friends) only on log steps.

A sync (``.item()``, ``float(t)``, ``bool(t)``, ...) stalls the CPU until the GPU has drained its
queue, so one per step costs throughput. The tensor methods that force one are patched to record
which step called them while ``Trainer.fit`` runs the default debug config.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.optim.optimizer import adamw_kwargs
from tests.helpers import REPO, record_host_syncs


def test_trainer_syncs_only_on_log_steps(tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bigtrain import messages
    from bigtrain.train.trainer import Trainer

    every, steps = 4, 5  # log steps 1, 4, 5; steps 2 and 3 must not sync
    cfg = load_config(REPO / "configs" / "debug.yaml", [
        f"run.out_dir={tmp_path / 'run'}", f"train.max_steps={steps}", f"log.every_steps={every}",
        "eval.every_steps=0", "eval.at_end=false", "checkpoint.at_end=false", "log.sample_at_end=false",
        "log.console=false", "data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2",
    ])
    with messages.capture():
        trainer = Trainer(cfg)
    syncs = record_host_syncs(trainer, monkeypatch)
    with messages.capture() as printed:
        trainer.fit()
    monkeypatch.undo()

    log_steps = {1, steps} | {s for s in range(1, steps + 1) if s % every == 0}
    assert set(syncs) - {0} <= log_steps, f"host syncs on non-log steps: {dict(syncs)} (log steps {sorted(log_steps)})"
    assert all(syncs.get(s, 0) > 0 for s in log_steps), f"the recorder missed the log steps' .item(): {dict(syncs)}"
    # The run header reports the kernel and attention backends at startup.
    assert "kernels  torch (reference ops); attention SDPA" in printed[0]


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere() -> None:
    from bigtrain.optim.optimizer import build_adamw

    cpu_model = torch.nn.Linear(4, 4)
    opt = build_adamw(cpu_model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
    params = list(cpu_model.parameters())
    assert adamw_kwargs(params) == {"foreach": True}
    assert adamw_kwargs(params, device_type="cuda") == {"fused": True}
