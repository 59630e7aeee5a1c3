"""Learning per second on CPU: validation bits-per-byte after the same training wall-clock budget.

On the demo corpus (`bigtrain data demo`), each contender trains for ``--seconds`` of wall-clock time
and is then scored on the whole validation split (the held-out plays) in bits per UTF-8 byte:

  (a) plain: a minimal hand-written PyTorch loop with a GPT-2-style model (LayerNorm, GELU MLP, learned
      positions, tied embeddings, AdamW, warm-up + cosine schedule), at the best learning rate of a
      small sweep (``--plain-lrs``, every point reported);
  (b) bigtrain, AdamW, at the best learning rate of its own sweep (``--adamw-lrs``, every point reported);
  (c) bigtrain, Muon;   (d) bigtrain, Muon + QK-norm (the demo recipe, configs/debug.yaml).

Equal time, not equal steps: each contender first runs a few calibration steps to measure its own
step time, then trains ``floor(seconds / step time)`` steps with its schedule ending there (a run
more than 5% off the budget is run again at the length its own step time gives: bench/equal_time.py
``within_budget``); the table reports the measured training time, the steps and tokens it got,
and the score. Every run uses the same model width and depth, sequence length, batch, and
evaluation windows (bigtrain's ``eval_batches``), and ``--threads`` CPU threads. The defaults are
the demo's shape and batch (configs/debug.yaml: dim 128, 4 layers, seq 64, 24 sequences = 1,536
tokens per step, 30 warm-up steps); AdamW contenders (plain and bigtrain) get a learning-rate
sweep, the Muon ones the demo's learning rates (``--muon-lr``, ``--muon-adamw-lr``).

    python bench/learning.py --out bench/results/learning-cpu-2core.md     # ~16 min at the default 90 s
    python bench/learning.py --seconds 20 --plain-lrs 3e-3 --adamw-lrs 3e-3  # a quick look

Targets (issue 17): bigtrain's best <= (a) - 0.05 bpb; Muon <= AdamW - 0.03 bpb at equal time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script
from equal_time import CALIBRATION_STEPS, MIN_STEPS, equal_time_run, retimed_note, within_budget

REPO = Path(__file__).resolve().parents[1]
MIN_LR_RATIO = 0.05  # configs/debug.yaml's train.min_lr_ratio, used by every contender


def shape_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.dim={args.dim}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"model.num_kv_heads={args.heads}", f"data.seq_len={args.seq_len}",
            f"train.global_batch_tokens={args.batch * args.seq_len}", f"train.micro_batch_size={args.batch}"]


# ---------------------------------------------------------------------------------------------- bigtrain
def bigtrain_contender(args: argparse.Namespace, name: str, extra: list[str], work: Path) -> dict[str, Any]:
    """configs/debug.yaml at the shared shape with ``extra`` overrides: calibrated, trained for the budget, scored."""
    def overrides(steps: int) -> list[str]:
        warmup = max(1, min(args.warmup, steps // 10))
        return [*shape_overrides(args), f"train.lr_warmup_steps={warmup}", *extra]

    return equal_time_run(name, "configs/debug.yaml", overrides, args.seconds, work, threads=args.threads)


# ---------------------------------------------------------------------------------------------- plain loop
def plain_model(vocab: int, args: argparse.Namespace) -> Any:
    """GPT-2 style: learned positions, pre-LayerNorm blocks with GELU MLP (4x), tied embeddings."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(args.dim), nn.LayerNorm(args.dim)
            self.qkv, self.proj = nn.Linear(args.dim, 3 * args.dim), nn.Linear(args.dim, args.dim)
            self.fc, self.out = nn.Linear(args.dim, 4 * args.dim), nn.Linear(4 * args.dim, args.dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, args.heads, d // args.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, args.dim), nn.Embedding(args.seq_len, args.dim)
            self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
            self.ln = nn.LayerNorm(args.dim)
            self.apply(self._init)

        @staticmethod
        def _init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            return F.linear(self.ln(x), self.tok.weight)

    return GPT()


def plain_contender(args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """The hand-written loop at one learning rate: calibrate, train for the budget, score."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from bigtrain.data.batches import TokenStream, eval_batches
    from bigtrain.data.tokenizer import Tokenizer
    from bigtrain.train.metrics import bits_per_byte

    torch.set_num_threads(args.threads)
    demo = REPO / "data" / "demo"
    tok = Tokenizer.from_file(demo / "tokenizer.json")
    vocab = tok.vocab_size
    train = TokenStream.open(str(demo / "train"), vocab_size=vocab, tokenizer_fingerprint=None, what="train")
    val = TokenStream.open(str(demo / "val"), vocab_size=vocab, tokenizer_fingerprint=None, what="val")
    byte_lengths = torch.from_numpy(tok.token_byte_lengths())
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = plain_model(vocab, args)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), foreach=True)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, train.num_tokens - args.seq_len - 1, size=args.batch)
        arr = torch.from_numpy(np.stack([train.read(int(s), args.seq_len + 1) for s in starts]))
        return arr[:, :-1], arr[:, 1:]

    def step(i: int, total: int) -> float:
        # Linear warm-up, then cosine down to MIN_LR_RATIO x lr at the last step (configs/debug.yaml's schedule).
        warm = max(1, min(args.warmup, total // 10))
        if i < warm:
            factor = (i + 1) / warm
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))
            factor = MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cosine
        for g in opt.param_groups:
            g["lr"] = lr * factor
        x, y = batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    init = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    for i in range(CALIBRATION_STEPS):
        if i == CALIBRATION_STEPS // 2:
            t0 = time.perf_counter()
        step(i, 10 ** 9)
    step_s = (time.perf_counter() - t0) / (CALIBRATION_STEPS - CALIBRATION_STEPS // 2)

    def train_and_score(steps: int) -> dict[str, Any]:
        """A fresh run from the same init and data order (calibration steps do not count), scored."""
        nonlocal opt, rng
        model.load_state_dict(init)
        model.train()
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95), foreach=True)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        loss = math.nan
        for i in range(steps):
            loss = step(i, steps)
        train_s = time.perf_counter() - t0
        model.eval()
        loss_sum, nbytes = 0.0, 0
        with torch.no_grad():
            for b in eval_batches(val, seq_len=args.seq_len, micro_batch_size=args.batch, max_batches=0):
                losses = F.cross_entropy(model(b.inputs).flatten(0, 1), b.targets.flatten(), reduction="none")
                loss_sum += losses.double().sum().item()
                nbytes += int(byte_lengths[b.targets].sum())
        return {"steps": steps, "tokens": steps * args.batch * args.seq_len, "train_s": train_s, "wall_s": train_s,
                "val_bpb": bits_per_byte(loss_sum, nbytes), "final_loss": loss}

    result = within_budget(train_and_score, max(MIN_STEPS, int(args.seconds / step_s)), args.seconds)
    return {"name": f"plain PyTorch (lr {lr:g})", **result, "calibrated_step_s": step_s, "lr": lr}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget per contender")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=24, help="sequences per step")
    ap.add_argument("--warmup", type=int, default=30, help="LR warm-up steps (at most a tenth of the run)")
    ap.add_argument("--plain-lrs", default="2e-3,4e-3,8e-3", help="the plain loop's learning-rate sweep")
    ap.add_argument("--adamw-lrs", default="2e-3,4e-3,8e-3", help="bigtrain AdamW's train.lr sweep")
    ap.add_argument("--muon-lr", type=float, default=4e-3, help="train.lr of the Muon contenders")
    ap.add_argument("--muon-adamw-lr", type=float, default=1e-2,
                    help="train.muon.adamw_lr of the Muon contenders (embeddings, output projection, norms)")
    ap.add_argument("--only", default="plain,adamw,muon,muon+qknorm")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if not (REPO / "data" / "demo" / "manifest.json").is_file():
        sys.exit("the demo corpus is missing: run `make demo-data` (or `bigtrain data demo`) first")
    only = args.only.split(",")
    muon = ["train.optimizer=muon", f"train.lr={args.muon_lr}", f"train.muon.adamw_lr={args.muon_adamw_lr}"]
    contenders = {f"adamw (lr {lr:g})": ["train.optimizer=adamw", "model.qk_norm=false", f"train.lr={lr}"]
                  for lr in (float(x) for x in args.adamw_lrs.split(","))} if "adamw" in only else {}
    contenders |= {name: extra for name, extra in {"muon": [*muon, "model.qk_norm=false"],
                                                    "muon+qknorm": [*muon, "model.qk_norm=true"]}.items()
                   if name in only}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bigtrain-learning-") as tmp:
        if "plain" in only:
            for lr in (float(x) for x in args.plain_lrs.split(",")):
                print(f"plain PyTorch, lr {lr:g} ...", flush=True)
                rows.append(plain_contender(args, lr))
                print(f"  {rows[-1]['val_bpb']:.4f} bpb after {rows[-1]['steps']} steps", flush=True)
        for name, extra in contenders.items():
            print(f"bigtrain {name} ...", flush=True)
            rows.append(bigtrain_contender(args, f"bigtrain {name}", extra, Path(tmp)))
            print(f"  {rows[-1]['val_bpb']:.4f} bpb after {rows[-1]['steps']} steps", flush=True)
    import torch

    plain = [r for r in rows if r["name"].startswith("plain")]
    best_plain = min(plain, key=lambda r: r["val_bpb"]) if plain else None
    out = io.StringIO()
    out.write(f"# Learning per second: validation bits-per-byte after {args.seconds:.0f} s of training (CPU)\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {git_commit()}  torch {torch.__version__}\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), {args.threads} threads\n")
    out.write(f"- every contender: dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq_len}, "
              f"{args.batch} sequences/step, fp32; Muon contenders: train.lr {args.muon_lr:g}, "
              f"train.muon.adamw_lr {args.muon_adamw_lr:g}; score = whole validation split "
              "(held-out plays), bigtrain's eval windows\n\n")
    out.write("| contender | steps | tokens | train s | val bpb | vs best plain |\n|---|---:|---:|---:|---:|---:|\n")
    for r in rows:
        delta = f"{r['val_bpb'] - best_plain['val_bpb']:+.3f}" if best_plain else "-"
        out.write(f"| {r['name']} | {r['steps']} | {r['tokens']:,} | {r['train_s']:.0f} | {r['val_bpb']:.4f} "
                  f"| {delta} |\n")
    by = {r["name"]: r for r in rows}
    lines = []
    bigtrain_rows = [r for r in rows if r["name"].startswith("bigtrain")]
    if best_plain and bigtrain_rows:
        best = min(bigtrain_rows, key=lambda r: r["val_bpb"])
        gap = best["val_bpb"] - best_plain["val_bpb"]
        lines.append(f"bigtrain's best ({best['name']}) - best plain = {gap:+.3f} bpb "
                     f"({'meets' if gap <= -0.05 else 'MISSES'} the <= -0.05 target)")
    adamw = [r for r in rows if r["name"].startswith("bigtrain adamw")]
    if adamw and "bigtrain muon" in by:
        best_adamw = min(adamw, key=lambda r: r["val_bpb"])
        gap = by["bigtrain muon"]["val_bpb"] - best_adamw["val_bpb"]
        lines.append(f"Muon - best AdamW ({best_adamw['name']}) = {gap:+.3f} bpb "
                     f"({'meets' if gap <= -0.03 else 'MISSES'} the <= -0.03 target)")
    if retimed_note(rows):
        lines.append(retimed_note(rows))
    out.write("\n" + "  \n".join(lines) + "\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
