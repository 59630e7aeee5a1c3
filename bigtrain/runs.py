"""`bigtrain runs [DIR]`: a table of the run folders under DIR, and the reading of run folders
shared with `bigtrain plot`.

A run folder is one with a ``config.yaml`` and a ``metrics.jsonl`` or ``status.json`` (see
DESIGN.md). Status comes from ``status.json`` (written by the trainer and the launch code); a
``running`` run whose process no longer exists on this host is shown as ``failed``; folders from
before status files existed show ``unknown``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigtrain.errors import UserError
from bigtrain.train.loggers import fmt_duration
from bigtrain.train.status import effective_status, read_status

MAX_DEPTH = 4  # how deep under DIR to look for run folders


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "status.json").is_file())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl as the surviving history of the run.

    A resumed run appends to the same file; when it restarted from a checkpoint older than the
    last logged step, the records past that checkpoint were superseded and are dropped (per
    kind), so curves do not zigzag. A partial last line (a killed writer) is skipped.
    """
    by_kind: dict[str, list[dict[str, Any]]] = {}
    order: list[dict[str, Any]] = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        kept = by_kind.setdefault(str(record.get("kind", "")), [])
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()["_superseded"] = True
        kept.append(record)
        order.append(record)
    return [r for r in order if not r.pop("_superseded", False)]


def find_runs(root: Path) -> list[Path]:
    """Run folders at or under ``root`` (not descending into a run folder or hidden folders)."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []

    def walk(path: Path, depth: int) -> Iterator[Path]:
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if is_run_dir(child):
                yield child
            elif depth < MAX_DEPTH and child.name not in ("checkpoints", "wandb", "tensorboard", "profile"):
                yield from walk(child, depth + 1)

    found.extend(walk(root, 1))
    return found


@dataclass
class RunSummary:
    """One row of the runs table."""

    path: Path
    name: str
    status: str
    step: int | None
    max_steps: int | None
    tokens: int | None
    loss: float | None
    val_bpb: float | None
    checkpoint: str | None
    wall_time_s: float | None
    started: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def summarize_run(run_dir: Path) -> RunSummary:
    """Combine status.json, metrics.jsonl, config.yaml and checkpoints/latest into one row."""
    status = read_status(run_dir) or {}
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    cfg = _read_config(run_dir)
    last_train, last_eval = (train[-1] if train else {}), (evals[-1] if evals else {})

    def pick(key: str, *sources: dict[str, Any]) -> Any:
        for source in sources:
            if source.get(key) is not None:
                return source[key]
        return None

    latest = run_dir / "checkpoints" / "latest"
    checkpoint = latest.read_text().strip() if latest.is_file() else None
    if not checkpoint and status.get("last_checkpoint"):
        checkpoint = Path(str(status["last_checkpoint"])).name
    wall = status.get("wall_time_s")
    state = effective_status(status) if status else "unknown"
    if state == "running" and wall is not None and status.get("updated_time"):
        wall = float(wall) + max(0.0, time.time() - float(status["updated_time"]))
    if wall is None and records:
        times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
        wall = (max(times) - min(times)) if len(times) > 1 else None
    started = status.get("first_start_time") or status.get("start_time") or (run_dir / "config.yaml").stat().st_mtime
    return RunSummary(
        path=run_dir,
        name=str(status.get("name") or (cfg.get("run") or {}).get("name") or run_dir.name),
        status=state,
        step=pick("step", status, last_train),
        max_steps=pick("max_steps", status) or (cfg.get("train") or {}).get("max_steps"),
        tokens=pick("tokens", status, last_train),
        loss=pick("loss", status, last_train),
        val_bpb=pick("val_bpb", status, last_eval),
        checkpoint=checkpoint,
        wall_time_s=None if wall is None else float(wall),
        started=float(started),
    )


def _fmt_tokens(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_table(runs: list[RunSummary], root: Path) -> str:
    """A fixed-width table, one row per run, oldest first."""
    header = ["RUN", "NAME", "STATUS", "STEP", "TOKENS", "LOSS", "VAL_BPB", "CHECKPOINT", "WALL"]
    rows = [header]
    for r in runs:
        try:
            where = str(r.path.relative_to(root)) if r.path != root else r.path.name
        except ValueError:
            where = str(r.path)
        step = "-" if r.step is None else (f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step))
        rows.append([
            where, r.name, r.status, step, _fmt_tokens(r.tokens),
            "-" if r.loss is None else f"{r.loss:.4f}", "-" if r.val_bpb is None else f"{r.val_bpb:.4f}",
            r.checkpoint or "-", "-" if r.wall_time_s is None else fmt_duration(r.wall_time_s),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines) + "\n"


def list_runs(root: str | Path, *, as_json: bool = False) -> str:
    """The output of ``bigtrain runs``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a folder; pass the folder holding your run folders "
                        f"(e.g. `bigtrain runs runs/`) or one run folder (run.out_dir).")
    runs = sorted((summarize_run(p) for p in find_runs(root)), key=lambda r: (r.started, str(r.path)))
    if as_json:
        return json.dumps([r.as_dict() for r in runs], indent=1) + "\n"
    if not runs:
        return (f"no runs under {root}{os.sep} (a run folder holds config.yaml and metrics.jsonl; "
                f"see run.out_dir)\n")
    return format_table(runs, root)
