"""Trainer overhead: bigtrain's Trainer.fit against a minimal hand-written PyTorch loop.

Both train the same model (configs/debug.yaml by default) on the same demo shards with the
same batch, AdamW (bigtrain's run is switched to it when the config says Muon) and clipping, in one
process on this machine. Runs alternate (plain,
bigtrain, plain, ...) so drift in machine speed hits both; the table reports the median
per-step time of each and the ratio. Target: bigtrain <= 1.05x the plain loop.

    python bench/overhead.py [--config configs/debug.yaml] [--steps 25] [--repeats 5]
        [--out bench/results/overhead-cpu.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script

from bigtrain.config import load_config
from bigtrain.data.shards import Shard, list_shards
from bigtrain.model import build_on_meta, materialize

WARMUP_STEPS = 5  # excluded from both timings (allocator and first-call warm-up)


def plain_loop(cfg, steps: int) -> float:
    """The loop a researcher writes by hand: random windows, forward, backward, clip, step.

    Returns seconds per step over the steps after WARMUP_STEPS.
    """
    torch.manual_seed(cfg.run.seed)
    tokens = np.concatenate([Shard(p).tokens for p in list_shards(cfg.data.train_path)]).astype(np.int64)
    model = materialize(build_on_meta(cfg.model), "cpu", seed=cfg.run.seed)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            foreach=True)
    seq, micro = cfg.data.seq_len, t.micro_batch_size
    accum = t.global_batch_tokens // (seq * micro)
    rng = np.random.default_rng(0)
    loss = torch.zeros(())  # the last micro-batch's loss; .item() waits for the work queued before it
    for step in range(steps):
        if step == WARMUP_STEPS:
            loss.item()
            start = time.perf_counter()
        for _ in range(accum):
            idx = rng.integers(0, len(tokens) - seq - 1, micro)
            batch = torch.from_numpy(np.stack([tokens[i: i + seq + 1] for i in idx]))
            loss = model(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return (time.perf_counter() - start) / (steps - WARMUP_STEPS)


def bigtrain_loop(config: str, steps: int) -> float:
    """Trainer.fit, timed by its own metrics.jsonl: the step-time windows after WARMUP_STEPS."""
    from bigtrain import messages
    from bigtrain.train.trainer import Trainer

    assert steps % WARMUP_STEPS == 0
    with tempfile.TemporaryDirectory() as out:
        # AdamW like the plain loop (the demo config trains with Muon): this measures the trainer, not the optimizer.
        cfg = load_config(config, [f"run.out_dir={out}", f"train.max_steps={steps}", "train.optimizer=adamw",
                                   "eval.every_steps=0",
                                   "eval.at_end=false", "checkpoint.at_end=false", "log.sample_at_end=false",
                                   "log.console=false", f"log.every_steps={WARMUP_STEPS}"])
        with messages.capture():  # the run's own output would interleave with the table
            trainer = Trainer(cfg)
            trainer.fit()
        trainer.loader.close()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [r["step_time_s"] for r in records if r["kind"] == "train" and r["step"] > WARMUP_STEPS]
    return sum(windows) / len(windows)  # equal-length windows



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/debug.yaml")
    ap.add_argument("--steps", type=int, default=25,
                    help="steps per timed run (a multiple of 5; the first 5 are warm-up)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    plain, ours = [], []
    for r in range(args.repeats):
        plain.append(plain_loop(cfg, args.steps))
        ours.append(bigtrain_loop(args.config, args.steps))
        print(f"repeat {r + 1}/{args.repeats}: plain {plain[-1] * 1000:.0f} ms/step, "
              f"bigtrain {ours[-1] * 1000:.0f} ms/step", flush=True)
    p, b = statistics.median(plain), statistics.median(ours)
    commit = git_commit()
    out = io.StringIO()
    out.write(f"# Trainer overhead ({args.config})\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {commit}\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}\n")
    out.write(f"- {args.steps} steps ({WARMUP_STEPS} warm-up steps not timed) x {args.repeats} alternating repeats, "
              f"{cfg.train.global_batch_tokens} tokens/step; median shown, all repeats listed below\n\n")
    out.write("| loop | ms/step | tokens/s | ratio vs plain |\n|---|---:|---:|---:|\n")
    for name, v in (("plain PyTorch", p), ("bigtrain Trainer", b)):
        out.write(f"| {name} | {v * 1000:.1f} | {cfg.train.global_batch_tokens / v:,.0f} | {v / p:.3f} |\n")
    verdict = "meets" if b / p <= 1.05 else "MISSES"
    out.write(f"\nbigtrain / plain = {b / p:.3f} ({verdict} the <= 1.05 target)\n\n")
    out.write("repeats (ms/step, plain / bigtrain): " + ", ".join(
        f"{x * 1000:.0f} / {y * 1000:.0f}" for x, y in zip(plain, ours, strict=True)) + "\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
