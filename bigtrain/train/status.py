"""RUN_DIR/status.json: what a run is doing now, for ``bigtrain runs`` and for people.

The trainer writes ``running`` at start, ``finished`` at a normal end and ``failed`` when an
exception escapes ``fit``; the launch code writes ``preempted`` when it exits on a signal.
Writes are atomic (temp file + rename) so a reader never sees half a file, even if the
process is killed mid-write. Fields given to a later write are merged over the earlier ones,
so e.g. ``start_time`` survives the final ``finished`` write.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
STATUSES = ("running", "finished", "failed", "preempted")


def write_status(run_dir: Path | str, status: str, **fields: Any) -> None:
    """Atomically write RUN_DIR/status.json with ``status`` merged over the previous fields.

    ``fields`` are free-form JSON-able values, by convention: step, tokens, loss, val_bpb,
    last_checkpoint, start_time, end_time (unix seconds), error. ``pid``, ``hostname`` and
    ``updated_time`` are filled in automatically.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")  # programmer error
    run_dir = Path(run_dir)
    previous = read_status(run_dir) or {}
    record = {**previous, **fields, "status": status, "pid": os.getpid(), "hostname": socket.gethostname(),
              "updated_time": round(time.time(), 3)}
    if status != "running":
        record.setdefault("end_time", record["updated_time"])
    else:
        for stale in ("end_time", "error", "signal"):  # a resumed run is running again
            record.pop(stale, None)
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / STATUS_FILE)


def read_status(run_dir: Path | str) -> dict[str, Any] | None:
    """The parsed RUN_DIR/status.json, or None when it is missing or unreadable."""
    path = Path(run_dir) / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_status(status: dict[str, Any] | None) -> str:
    """The status to show: a ``running`` run whose process is gone on this host is ``failed``
    (it died without writing a final status, e.g. SIGKILL/OOM); on another host it is ``running?``
    since we cannot check."""
    if not status:
        return "unknown"
    state = str(status.get("status", "unknown"))
    if state != "running":
        return state
    if status.get("hostname") == socket.gethostname():
        return "running" if process_alive(int(status.get("pid", 0) or 0)) else "failed"
    return "running?"
