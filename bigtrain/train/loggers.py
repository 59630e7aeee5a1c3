"""Where metrics go: a readable console line and metrics.jsonl (always)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (flushed each line)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def close(self) -> None:
        self.fh.close()


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


class ConsoleLogger:
    """One aligned line per training log step or evaluation."""

    def __init__(self, max_steps: int, stream: Any = None) -> None:
        self.max_steps = max_steps
        self.width = len(str(max_steps))
        self.stream = stream or sys.stdout

    def log(self, record: dict[str, Any]) -> None:
        step = f"step {record['step']:>{self.width}}/{self.max_steps}"
        if record.get("kind") == "eval":
            line = f"{step} | val_loss {record['val_loss']:.4f} | val_bpb {record['val_bpb']:.4f} | {record['eval_s']:.1f}s"
        elif record.get("kind") == "train":
            mfu = record.get("mfu")
            line = (
                f"{step} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f}"
                f" | {_fmt_rate(record['tokens_per_s'])} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
                f" | {1000 * record['step_time_s']:.0f} ms/step | mem {record['memory_gib']:.2f} GiB"
            )
        else:
            return
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass
