"""RUN_DIR/status.json: what a run is doing now, for ``bigtrain runs`` and for people.

The trainer writes ``running`` at start, ``finished`` at a normal end and ``failed`` when an
exception escapes ``fit``; the launch code writes ``preempted`` when it exits on a signal.
Writes are atomic (temp file + rename) so a reader never sees half a file, even if the
process is killed mid-write. Fields given to a later write are merged over the earlier ones,
so e.g. ``start_time`` survives the final ``finished`` write.
"""
from __future__ import annotations

import json
import math
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
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if isinstance(k, str) and valid_field(k, v)}


# What a status field may hold. A field of another type (a file edited by hand, or by a broken tool) is dropped
# when read, so one bad folder cannot break `bigtrain runs` or a resume; unknown fields pass through.
_NUMBER = (int, float)
STATUS_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "status": (str,), "name": (str,), "hostname": (str,), "signal": (str,), "error": (str,),
    "last_checkpoint": (str,), "pid": (int,), "step": (int,), "max_steps": (int,), "tokens": (int,),
    "loss": _NUMBER, "val_bpb": _NUMBER, "wall_time_s": _NUMBER, "updated_time": _NUMBER, "start_time": _NUMBER,
    "first_start_time": _NUMBER, "end_time": _NUMBER,
}
MAX_PID = 2 ** 22  # Linux's pid_max ceiling: a larger "pid" is not a process


def valid_field(key: str, value: Any) -> bool:
    """Whether ``value`` is what status field ``key`` may hold (finite numbers, no bools for counts)."""
    types = STATUS_FIELD_TYPES.get(key)
    if types is None:
        return True
    if isinstance(value, bool) or not isinstance(value, types):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not (key == "pid" and isinstance(value, int) and not 0 < value <= MAX_PID)


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (False for anything that cannot be a pid)."""
    if not 0 < pid <= MAX_PID:  # os.kill would raise OverflowError beyond C's int
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
        pid = status.get("pid", 0)
        return "running" if isinstance(pid, int) and process_alive(pid) else "failed"
    return "running?"
