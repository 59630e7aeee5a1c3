"""Measure what each rank holds after a real training step (run under torchrun; writes JSON per rank).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed/measure_memory.py \
        OUT_DIR configs/debug.yaml parallel.strategy=fsdp ...

One ``Trainer.train_step()`` creates the optimizer state; the step clears the gradients, so one
more forward/backward (no step) brings them back — as at the peak of a step, after backward and
before the update. Then ``trainer.strategy.held_state_bytes`` is written to OUT_DIR/rank{R}.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out_dir: str, config: str, *overrides: str) -> None:
    from bigtrain.config import load_config
    from bigtrain.parallel import dist
    from bigtrain.train.trainer import Trainer

    cfg = load_config(config, list(overrides))
    trainer = Trainer(cfg, echo=lambda *_: None)
    try:
        trainer.train_step()
        batch = trainer.loader.next_step()[0]
        with trainer.strategy.autocast():
            loss = trainer.model(batch.inputs.to(trainer.info.device), batch.targets.to(trainer.info.device))
        trainer.strategy.backward(loss)
        held = trainer.strategy.held_state_bytes(trainer.model, trainer.optimizer)
        # ZeRO-3 diagnostics: parameters whose full data is held next to their partition (gathered or persistent).
        full = [name for name, p in trainer.strategy.unwrap(trainer.model).named_parameters()
                if hasattr(p, "ds_tensor") and p.data.numel() > 0]
        record = {"zero3_full_params": full, "rank": trainer.info.rank, "world_size": trainer.info.world_size,
                  "strategy": cfg.parallel.strategy, "zero_stage": cfg.parallel.zero.stage,
                  "compute_dtype": str(trainer.strategy.compute_dtype).replace("torch.", ""), "held": held}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.info.rank}.json").write_text(json.dumps(record))
        trainer.strategy.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
