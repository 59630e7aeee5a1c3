"""Equal wall-clock training runs of `bigtrain train` on CPU (shared by bench/learning.py and bench/moe.py).

A contender is a config plus overrides. It first trains ``CALIBRATION_STEPS`` steps to measure its own
step time (the later half of them; the first few are slower: allocator, caches), then trains
``floor(seconds / step time)`` steps with its LR schedule ending there and is scored on the whole
validation split (``eval.final_max_batches=0``); a run whose training time misses the budget by more
than ``BUDGET_TOLERANCE`` is run once more at the corrected length (``within_budget``). Each run is
a fresh `bigtrain train` subprocess in the repository root with ``threads`` CPU threads, fp32, no
checkpoints, no samples.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_STEPS = 40  # the first few are slower (allocator, caches): the later half is timed (12 steps gave
# timed runs 77-114 s for a 90 s budget: a 6-step estimate is at the mercy of jitter)
MIN_STEPS = 10
# A timed run whose training time misses the budget by more than this fraction is re-run once at the length
# its own whole-run step time gives: 20 calibration steps on a shared VM can be 10-15% off (measured: timed
# runs of 78-104 s for a 90 s budget).
BUDGET_TOLERANCE = 0.05


def train_cli(config: str | Path, overrides: Sequence[str], steps: int, out: Path, *, threads: int,
              evaluate: bool = True) -> dict[str, Any]:
    """`bigtrain train config` in a subprocess for ``steps`` steps; its train records and final eval record
    (None when ``evaluate`` is false). ``overrides`` may replace the standard ones (a later key wins)."""
    standard = [f"run.out_dir={out}", f"train.max_steps={steps}", f"run.num_threads={threads}", "run.device=cpu",
                "train.precision=fp32", "eval.every_steps=0", f"eval.at_end={'true' if evaluate else 'false'}",
                "eval.final_max_batches=0", "checkpoint.at_end=false", "checkpoint.every_steps=0",
                "log.sample_at_end=false", "log.console=false", f"log.every_steps={max(1, steps // 8)}"]
    merged: dict[str, str] = {}
    for text in [*standard, *overrides]:  # the command line refuses a key given twice: keep the last
        merged[text.split("=", 1)[0].strip()] = text
    cmd = [sys.executable, "-m", "bigtrain", "train", str(config), *merged.values()]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bigtrain train failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"train": train, "eval": evals[-1] if evals else None}


def window_sizes(train: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Each log record with the number of steps its step_time_s averages over."""
    out, prev = [], 0
    for r in train:
        out.append((r, r["step"] - prev))
        prev = r["step"]
    return out


def measured_train_s(train: list[dict[str, Any]]) -> float:
    """Training time of a run from its log records (step times only: no start-up, no evaluation)."""
    return sum(r["step_time_s"] * n for r, n in window_sizes(train))


def calibrated_steps(train: list[dict[str, Any]], seconds: float,
                     calibration_steps: int = CALIBRATION_STEPS) -> tuple[int, float]:
    """(steps that fit in ``seconds``, at least MIN_STEPS; the step time) from a calibration run's records."""
    later = [r for r in train if r["step"] > calibration_steps // 2] or train[-1:]
    step_s = sum(r["step_time_s"] for r in later) / len(later)
    return max(MIN_STEPS, int(seconds / step_s)), step_s


def calibrate(config: str | Path, overrides_for: Callable[[int], list[str]], seconds: float, out: Path, *,
              threads: int) -> tuple[int, float]:
    """Train CALIBRATION_STEPS steps (no evaluation) and return (steps for ``seconds``, step time)."""
    calib = train_cli(config, overrides_for(CALIBRATION_STEPS), CALIBRATION_STEPS, out, threads=threads,
                      evaluate=False)
    return calibrated_steps(calib["train"], seconds)


def timed_run(config: str | Path, overrides_for: Callable[[int], list[str]], steps: int, out: Path, *,
              threads: int) -> dict[str, Any]:
    """Train ``steps`` steps and score on the whole validation split: steps, tokens, train_s, wall_s,
    val_bpb, final_loss and the last train record."""
    t0 = time.perf_counter()
    run = train_cli(config, overrides_for(steps), steps, out, threads=threads)
    wall = time.perf_counter() - t0
    last = run["train"][-1]
    return {"steps": steps, "tokens": last["tokens"], "train_s": measured_train_s(run["train"]), "wall_s": wall,
            "val_bpb": run["eval"]["val_bpb"], "final_loss": last["loss"], "last_train": last}


def within_budget(run: Callable[[int], dict[str, Any]], steps: int, seconds: float, *,
                  tolerance: float = BUDGET_TOLERANCE) -> dict[str, Any]:
    """``run(steps)`` (a fresh run that reports ``train_s``); when its training time misses ``seconds`` by more
    than ``tolerance`` (a fraction), once more at ``steps * seconds / train_s`` steps, whose result is returned
    with ``retimed_from`` = (steps, train_s) of the first try."""
    first = run(steps)
    corrected = max(MIN_STEPS, int(steps * seconds / first["train_s"]))
    if abs(first["train_s"] - seconds) <= tolerance * seconds or corrected == steps:
        return first
    return {**run(corrected), "retimed_from": (steps, first["train_s"])}


def retimed_note(rows: Sequence[dict[str, Any]]) -> str:
    """One line naming the runs ``within_budget`` ran twice, or '' when none was."""
    retimed = [f"{r['name']} ({r['retimed_from'][0]} steps took {r['retimed_from'][1]:.0f} s)"
               for r in rows if "retimed_from" in r]
    if not retimed:
        return ""
    return (f"Re-timed (first try outside the budget +-{BUDGET_TOLERANCE:.0%}, run again at the length its own "
            "step time gave; the table has the second run): " + "; ".join(retimed))


def equal_time_run(name: str, config: str | Path, overrides_for: Callable[[int], list[str]], seconds: float,
                   work: Path, *, threads: int) -> dict[str, Any]:
    """Calibrate, then train for ``seconds`` (re-timed once when off the budget, see ``within_budget``): the
    timed run's result with its name and calibrated step time."""
    steps, step_s = calibrate(config, overrides_for, seconds, work / f"{name}-calibrate", threads=threads)
    result = within_budget(lambda n: timed_run(config, overrides_for, n, work / f"{name}-{n}", threads=threads),
                           steps, seconds)
    return {"name": name, **result, "calibrated_step_s": step_s}
