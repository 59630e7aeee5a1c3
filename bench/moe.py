"""Mixture-of-Experts vs dense on CPU: validation bits-per-byte and tokens/s at equal training wall-clock.

Two arms on the demo corpus (`bigtrain data demo`), each with every setting of its own config
(data, sequence length, batch, optimizer, learning-rate schedule):

  dense: configs/debug.yaml        (the dense demo model)
  moe:   configs/moe-debug.yaml    (the same model with each SwiGLU replaced by routed experts; the
                                    preset is sized so its *active* parameters equal the dense model's)

Equal time, not equal steps (bench/equal_time.py, as bench/learning.py): each arm first runs a few
calibration steps to measure its own step time, then trains ``floor(seconds / step time)`` steps with
its config's schedule stretched to that length (warm-up scaled by steps / train.max_steps; a run more
than 5% off the budget is run again at the corrected length), and is scored on the whole validation
split (the held-out plays) in bits per UTF-8 byte. The table gives total and active parameters,
steps, tokens, measured training time, tokens/s and val bpb for each arm, with the ratio (or
difference) to the dense arm of the same run. No target: reported as measured.

    python bench/moe.py --out bench/results/moe-cpu-2core.md     # ~5 min at the default 90 s per arm
    python bench/moe.py --quick                                  # 20 s per arm: a quick look
    python bench/moe.py --steps 3 --set model.dim=32 ...         # fixed steps, no calibration (smoke test)
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script
from equal_time import MIN_STEPS, calibrate, retimed_note, timed_run, within_budget

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bigtrain from this checkout when it is not installed
QUICK_SECONDS = 20.0
# The settings both arms must share for the comparison to be at equal data, batch and schedule.
SHARED = ("data.train_path", "data.val_path", "data.tokenizer", "data.seq_len", "train.global_batch_tokens",
          "train.micro_batch_size", "train.optimizer", "train.lr", "train.lr_schedule", "train.lr_warmup_steps",
          "train.max_steps", "train.min_lr_ratio", "train.weight_decay", "train.grad_clip", "model.dim",
          "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.vocab_size")


class Arm:
    """One contender: a config (+ the common overrides), its parameter counts and its schedule."""

    def __init__(self, name: str, config: str, sets: list[str]) -> None:
        from bigtrain.config import load_config
        from bigtrain.model.config import count_parameters

        self.name, self.config, self.sets = name, config, sets
        self.cfg = load_config(REPO / config, sets)
        self.params = count_parameters(self.cfg.model)
        self.active = count_parameters(self.cfg.model, active=True)

    def describe(self) -> str:
        m = self.cfg.model
        ffn = (f"{m.moe.num_experts} experts x SwiGLU {m.moe.expert_hidden_dim or m.ffn_dim}, top-{m.moe.top_k}"
               + (f" + {m.moe.num_shared_experts} shared" if m.moe.num_shared_experts else "")
               + (f", {m.moe.first_dense_layers} dense first" if m.moe.first_dense_layers else "")
               + f", {m.moe.load_balance}") if m.moe else f"SwiGLU {m.ffn_dim}"
        return f"dim {m.dim}, {m.num_layers} layers, {ffn}"

    def overrides(self, steps: int) -> list[str]:
        """The config's LR schedule stretched to ``steps``: warm-up scaled by steps / train.max_steps."""
        t = self.cfg.train
        warmup = round(t.lr_warmup_steps * steps / t.max_steps)
        warmup = min(max(1, warmup), max(1, steps - 1)) if t.lr_warmup_steps else 0
        return [*self.sets, f"train.lr_warmup_steps={warmup}"]


def setting(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def render(args: argparse.Namespace, arms: list[Arm], rows: list[dict[str, Any]]) -> str:
    dense_arm, _ = arms
    base = rows[0]
    cfg = dense_arm.cfg
    differ = [k for k in SHARED if setting(arms[0].cfg, k) != setting(arms[1].cfg, k)]
    capped = [o.split("=", 1)[1] for o in args.sets if o.split("=", 1)[0].strip() == "eval.final_max_batches"]
    score = ("whole validation split (held-out plays)" if not capped or capped[-1].strip() == "0"
             else f"the first {capped[-1].strip()} validation batches (not the whole split)")
    out = io.StringIO()
    budget = f"{args.steps} steps each (fixed: not equal time)" if args.steps else f"{args.seconds:.0f} s of training"
    out.write(f"# Mixture-of-Experts vs dense: validation bits-per-byte and tokens/s after {budget} (CPU)\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {git_commit()}  torch {importlib.metadata.version('torch')}\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), {args.threads} threads, fp32\n")
    for arm in arms:
        out.write(f"- {arm.name}: `{arm.config}` ({arm.describe()})\n")
    out.write(f"- both: seq {cfg.data.seq_len}, {cfg.train.global_batch_tokens} tokens/step (micro-batch "
              f"{cfg.train.micro_batch_size}), {cfg.train.optimizer} lr {cfg.train.lr:g} {cfg.train.lr_schedule}; "
              "each arm's schedule stretched to its own step count (warm-up scaled by steps / train.max_steps); "
              f"score = {score}\n")
    if args.sets:
        out.write(f"- overrides on both arms: {' '.join(args.sets)}\n")
    if differ:
        out.write(f"- NOTE: the two configs differ in {', '.join(differ)} (the comparison is not at equal settings)\n")
    out.write("\n| arm | params | active params | steps | tokens | train s | tokens/s | val bpb |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for arm, r in zip(arms, rows, strict=True):
        tps = r["tokens"] / r["train_s"]
        base_tps = base["tokens"] / base["train_s"]
        out.write(f"| {arm.name} | {fmt_params(arm.params)} ({ratio(arm.params, dense_arm.params)}) | "
                  f"{fmt_params(arm.active)} ({ratio(arm.active, dense_arm.active)}) | "
                  f"{r['steps']} ({ratio(r['steps'], base['steps'])}) | "
                  f"{r['tokens']:,} ({ratio(r['tokens'], base['tokens'])}) | "
                  f"{r['train_s']:.1f} | {tps:,.0f} ({ratio(tps, base_tps)}) | "
                  f"{r['val_bpb']:.4f} ({r['val_bpb'] - base['val_bpb']:+.4f}) |\n")
    moe, dense = rows[1], rows[0]
    moe_tps, dense_tps = moe["tokens"] / moe["train_s"], dense["tokens"] / dense["train_s"]
    out.write("\n(in brackets: the ratio to the dense arm; for val bpb the difference)\n\n")
    lines = [f"moe - dense = {moe['val_bpb'] - dense['val_bpb']:+.4f} bpb at "
             + ("equal steps" if args.steps else "equal training time")
             + f"; moe trains at {moe_tps / dense_tps:.2f}x dense's tokens/s with "
             f"{arms[1].active / arms[0].active:.2f}x its active and {arms[1].params / arms[0].params:.2f}x its total "
             "parameters"]
    imbalance = moe["last_train"].get("moe_imbalance_max")
    if imbalance is not None:
        lines.append(f"moe routing at the last log step: busiest expert {imbalance:.2f}x the mean load (worst layer)")
    short = [arm.name for arm, r in zip(arms, rows, strict=True)
             if not args.steps and r["steps"] == MIN_STEPS and r["steps"] * r["calibrated_step_s"] > 1.1 * args.seconds]
    if short:
        lines.append(f"NOTE: {' and '.join(short)} trained the minimum of {MIN_STEPS} steps, longer than the "
                     f"{args.seconds:.0f} s budget: not equal time")
    if not args.steps:
        lines.append("calibrated step time: " + ", ".join(
            f"{arm.name} {r['calibrated_step_s'] * 1e3:.0f} ms" for arm, r in zip(arms, rows, strict=True))
            + "; measured: " + ", ".join(f"{arm.name} {r['train_s'] / r['steps'] * 1e3:.0f} ms"
                                         for arm, r in zip(arms, rows, strict=True)))
    if retimed_note(rows):
        lines.append(retimed_note(rows))
    out.write("  \n".join(lines) + "\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget per arm (default 90)")
    ap.add_argument("--quick", action="store_true", help=f"a quick look: --seconds {QUICK_SECONDS:.0f}")
    ap.add_argument("--steps", type=int, default=0,
                    help="train every arm this many steps instead (no calibration, not equal time; for smoke tests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-config", default="configs/debug.yaml")
    ap.add_argument("--moe-config", default="configs/moe-debug.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for both arms (repeatable), e.g. --set model.num_layers=2")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = QUICK_SECONDS
    if args.seconds <= 0 or args.steps < 0:
        ap.error("--seconds must be positive and --steps >= 0")
    if not (REPO / "data" / "demo" / "manifest.json").is_file():
        sys.exit("the demo corpus is missing: run `make demo-data` (or `bigtrain data demo`) first")
    arms = [Arm("dense", args.dense_config, args.sets), Arm("moe", args.moe_config, args.sets)]
    if arms[0].cfg.model.moe is not None or arms[1].cfg.model.moe is None:
        sys.exit(f"{args.dense_config} must be dense and {args.moe_config} a MoE model (model.moe)")
    for arm in arms:
        print(f"{arm.name}: {arm.config}: {arm.describe()}; {fmt_params(arm.params)} params, "
              f"{fmt_params(arm.active)} active", flush=True)
    with tempfile.TemporaryDirectory(prefix="bigtrain-moe-bench-") as tmp:
        work = Path(tmp)
        # Calibrate both arms first, then train both: slow drift of the machine hits the two alike.
        plan: list[tuple[int, float]] = []
        for arm in arms:
            if args.steps:
                plan.append((args.steps, 0.0))
                continue
            print(f"{arm.name}: calibrating ...", flush=True)
            plan.append(calibrate(arm.config, arm.overrides, args.seconds, work / f"{arm.name}-calibrate",
                                  threads=args.threads))
            print(f"  {plan[-1][1] * 1e3:.0f} ms/step -> {plan[-1][0]} steps", flush=True)
        rows = []
        for arm, (steps, step_s) in zip(arms, plan, strict=True):
            print(f"{arm.name}: training {steps} steps" + (f" (~{steps * step_s:.0f} s) ..." if step_s else " ..."),
                  flush=True)
            def run(n: int, arm: Arm = arm) -> dict[str, Any]:
                return timed_run(arm.config, arm.overrides, n, work / f"{arm.name}-{n}", threads=args.threads)

            result = run(steps) if args.steps else within_budget(run, steps, args.seconds)
            rows.append({"name": arm.name, **result, "calibrated_step_s": step_s})
            r = rows[-1]
            print(f"  {r['val_bpb']:.4f} bpb, {r['tokens'] / r['train_s']:,.0f} tokens/s, {r['train_s']:.1f} s of "
                  f"training ({r['wall_s']:.0f} s wall with start-up and evaluation)", flush=True)
    publish(render(args, arms, rows), args.out)


if __name__ == "__main__":
    main()
