"""Checkpoint save/load time vs plain torch.save/torch.load, and the step-loop stall of async vs sync saves.

One process, one model (gpt2-124m by default: 124M params, so model + AdamW state is ~1.5 GB in
fp32) with real AdamW state after one optimizer step. Per repeat, in alternating order:

* ``torch.save``: ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}`` to one file,
  flushed and fsynced (a checkpoint that is not on stable storage is not a checkpoint);
* bigtrain sync save: ``CheckpointManager.save(blocking=True)`` — DCP shard + per-rank file, CRC32
  of every file, fsync, manifest, rename, ``latest``;
* bigtrain async save: the time ``save()`` blocks the step loop (the host copy) and, separately,
  the time until the background write is committed;
* ``torch.load`` vs bigtrain's resume load (checksum verification + DCP read + state restore).

Targets: sync save <= 1.5x torch.save; async stall <= 0.2x the sync save.

    python bench/checkpoint.py [--preset gpt2-124m] [--repeats 3] [--device cpu|cuda]
        [--out bench/results/checkpoint-cpu-2core.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script

from bigtrain.checkpoint.config import CheckpointConfig
from bigtrain.checkpoint.manager import CheckpointManager
from bigtrain.checkpoint.rank_state import capture_rng
from bigtrain.config import load_config
from bigtrain.model import build_on_meta
from bigtrain.optim.optimizer import build_adamw
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.single import SingleStrategy


def build(preset: str, device: str):
    """Model + AdamW with state (one real step on a short batch), through the single-process strategy."""
    cfg = load_config(None, [f"model.preset={preset}", "data.seq_len=64", "train.global_batch_tokens=64",
                             "train.micro_batch_size=1"])
    strategy = SingleStrategy(DistInfo(0, 0, 1, torch.device(device)), "fp32", cfg.parallel, compile=False)
    t = cfg.train
    model, optimizer = strategy.wrap(build_on_meta(cfg.model), lambda m: build_adamw(
        m, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.adam_eps), seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 65), device=device)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cfg, strategy, model, optimizer


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def torch_save(model, optimizer, path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def torch_load(model, optimizer, path: Path, device: str) -> float:
    t0 = time.perf_counter()
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--note", default="", help="a line added to the results (e.g. 'machine shared with other jobs')")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    args = ap.parse_args()
    cfg, strategy, model, optimizer = build(args.preset, args.device)
    config = cfg.to_dict()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    base = Path(args.dir or tempfile.mkdtemp(prefix="bigtrain-bench-ckpt-"))
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {k: [] for k in ("torch.save", "sync save", "async stall", "async commit",
                                                        "torch.load", "bigtrain load")}
    rank_state = {"data": {"next_sample": 0}, "rng": capture_rng()}
    # One manager for the async saves, as in a training run: its host buffers are allocated by the
    # first save (timed separately, "first async stall") and reused by every later one.
    async_manager = CheckpointManager(base / "async", CheckpointConfig(keep_last=1))
    common = {"strategy": strategy, "model": model, "optimizer": optimizer, "rank_state": rank_state, "tokens_seen": 0,
              "config": config, "config_hash": "bench"}
    t0 = time.perf_counter()
    async_manager.save(1, blocking=False, **common)
    first_stall = time.perf_counter() - t0
    async_manager.wait()
    try:
        for r in range(args.repeats):
            results["torch.save"].append(torch_save(model, optimizer, base / "plain.pt"))
            results["torch.load"].append(torch_load(model, optimizer, base / "plain.pt", args.device))
            (base / "plain.pt").unlink()

            run = base / f"run{r}"
            manager = CheckpointManager(run, CheckpointConfig(keep_last=10))
            _sync(args.device)
            t0 = time.perf_counter()
            path = manager.save(1, blocking=True, **common)
            results["sync save"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            manager.load(path, strategy=strategy, model=model, optimizer=optimizer, current_config=config, seed=0,
                         auto=False)
            _sync(args.device)
            results["bigtrain load"].append(time.perf_counter() - t0)

            _sync(args.device)
            t0 = time.perf_counter()
            async_manager.save(r + 2, blocking=False, **common)
            results["async stall"].append(time.perf_counter() - t0)
            async_manager.wait()
            results["async commit"].append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()),
                  flush=True)
            shutil.rmtree(run)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    best = {k: min(v) for k, v in results.items()}
    commit = git_commit()
    device = (f"GPU {torch.cuda.get_device_name()}" if args.device == "cuda"
              else f"CPU {cpu_name()} ({os.cpu_count()} cores)")
    out = io.StringIO()
    out.write(f"# Checkpoint save/load ({args.preset}, {args.device})\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {commit}\n")
    out.write(f"- device: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    out.write(f"- state: model + AdamW (fp32) = {nbytes / 2**30:.2f} GiB, written to {base.parent} "
              f"(page cache + fsync); {args.repeats} alternating repeats, median shown\n")
    if args.note:
        out.write(f"- note: {args.note}\n")
    out.write("\n| operation | median s | GB/s | ratio (medians) | best s | ratio (bests) |\n"
              "|---|---:|---:|---:|---:|---:|\n")
    rows = [("torch.save (+fsync), baseline", "torch.save", "torch.save"),
            ("bigtrain sync save (DCP + CRC32 + fsync + manifest + rename)", "sync save", "torch.save"),
            ("bigtrain async save: step-loop stall (steady state)", "async stall", "sync save"),
            ("bigtrain async save: until committed (background)", "async commit", "sync save"),
            ("torch.load + load_state_dict, baseline", "torch.load", "torch.load"),
            ("bigtrain load (verify CRC32 + DCP read + restore)", "bigtrain load", "torch.load")]
    for label, key, ref in rows:
        out.write(f"| {label} | {med[key]:.2f} | {nbytes / med[key] / 1e9:.2f} | {med[key] / med[ref]:.2f}x {ref} | "
                  f"{best[key]:.2f} | {best[key] / best[ref]:.2f}x |\n")
    out.write(f"| bigtrain async save: stall of the first save (allocates the host buffers) | {first_stall:.2f} | "
              f"{nbytes / first_stall / 1e9:.2f} | {first_stall / med['sync save']:.2f}x sync save | - | - |\n")
    sync_ratio = med["sync save"] / med["torch.save"]
    stall_ratio = med["async stall"] / med["sync save"]
    out.write(f"\nsync save / torch.save = {sync_ratio:.2f} "
              f"({'meets' if sync_ratio <= 1.5 else 'MISSES'} the <= 1.5 target)  \n")
    out.write(f"async stall / sync save = {stall_ratio:.2f} "
              f"({'meets' if stall_ratio <= 0.2 else 'MISSES'} the <= 0.2 target)  \n")
    out.write(f"best-of-{args.repeats}: sync save / torch.save = {best['sync save'] / best['torch.save']:.2f}, "
              f"async stall / sync save = {best['async stall'] / best['sync save']:.2f}\n\n")
    repeats = "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v) for k, v in results.items())
    out.write(f"repeats (s): {repeats}\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
