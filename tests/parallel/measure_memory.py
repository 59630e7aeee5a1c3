"""Measure what each rank holds after a real training step (run in ranks by tests/helpers.py ``run_distributed``).

One ``Trainer.train_step()`` creates the optimizer state; the step clears the gradients, so one
more forward/backward over the next global batch (accumulated as in a step, no update) brings
them back — as at the peak of a step, after backward and before the update. Then
``trainer.strategy.held_state_bytes`` is recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def held_after_backward(trainer: Any) -> dict[str, int]:
    """Bytes this rank holds at the peak of a step (``trainer`` has run at least one step)."""
    from bigtrain.parallel.strategy import MicroBatch

    device = trainer.info.device
    batches = [MicroBatch(b.inputs.to(device), b.targets.to(device), trainer._doc_kwargs(b))
               for b in trainer.loader.next_step()]
    trainer.strategy.forward_backward(trainer.model, batches)  # what a step does before the update
    return trainer.strategy.held_state_bytes(trainer.model, trainer.optimizer)


def measure(rank: int, root: str, cases: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """In every rank: for each case (name -> overrides of configs/debug.yaml) build a Trainer, run one
    step, measure; returns this rank's record per case."""
    from tests.helpers import build_trainer

    records: dict[str, dict[str, Any]] = {}
    for name, overrides in cases.items():
        trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={Path(root) / name}", *overrides])
        trainer.train_step()
        held = held_after_backward(trainer)
        # ZeRO-3 diagnostics: parameters whose full data is held next to their partition (gathered or persistent).
        full = [n for n, p in trainer.strategy.unwrap(trainer.model).named_parameters()
                if hasattr(p, "ds_tensor") and p.data.numel() > 0]
        records[name] = {"zero3_full_params": full, "rank": trainer.info.rank, "world_size": trainer.info.world_size,
                         "strategy": trainer.cfg.parallel.strategy, "zero_stage": trainer.cfg.parallel.zero.stage,
                         "compute_dtype": str(trainer.strategy.compute_dtype).replace("torch.", ""), "held": held}
        trainer.strategy.barrier()
        del trainer
    return records
