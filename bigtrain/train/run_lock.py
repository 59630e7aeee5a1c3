"""One run per folder: a lock file that a launch holds on its run folder for its lifetime.

Two launches writing into one ``run.out_dir`` interleave their ``metrics.jsonl`` lines and leave one
run's checkpoints next to the other's ``config.yaml``. Rank 0 of a launch creates
``RUN_DIR/.bigtrain.lock`` atomically (``O_CREAT | O_EXCL``, which also holds on NFS v3+ and Lustre)
with its host, PID and a heartbeat time that a background thread refreshes every
:data:`HEARTBEAT_S` seconds; the other ranks of the launch share it through rank 0. ``flock`` alone
is not enough: it is per host on many shared filesystems, and a Slurm requeue runs on another node.

A second launch into a held folder is refused naming the holder. A lock left behind is taken over,
with a note, when its holder is provably gone: the same host and a PID that no longer runs, or any
host whose heartbeat is older than :data:`STALE_AFTER_S` (a killed node cannot clean up).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bigtrain import messages
from bigtrain.errors import UserError
from bigtrain.train.status import MAX_PID, process_alive

LOCK_FILE = ".bigtrain.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0  # many missed heartbeats: the holder's node died or froze


class RunLock:
    """The lock of one run folder, held by rank 0 of a launch (use :meth:`acquire` / :meth:`release`)."""

    def __init__(self, run_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ------------------------------------------------------------------ file
    def _record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self.started, "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        """The holder's record (None: no lock, or one too damaged to name anybody)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        # A record of the wrong types (a string time, a 10^20 pid) names nobody: it is treated as unreadable.
        typed = (isinstance(data.get("host"), str) and isinstance(data.get("pid"), int)
                 and not isinstance(data.get("pid"), bool) and 0 < data["pid"] <= MAX_PID
                 and all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
                         and math.isfinite(data[k]) for k in ("started", "heartbeat")))
        return data if typed else None

    def _create(self) -> bool:
        """Create the lock file if absent (atomic); False when someone holds it."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record(), fh)
        return True

    def _refresh(self) -> None:
        """Rewrite the heartbeat (write a sibling, rename over: readers never see half a record)."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.pid}.tmp")
        tmp.write_text(json.dumps(self._record()))
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ protocol
    def stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why ``holder`` no longer holds the folder (None: it does)."""
        if holder is None:
            return "an unreadable lock file"
        host, pid = holder.get("host"), holder.get("pid")
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if host == self.host and isinstance(pid, int) and not process_alive(pid):
            return f"process {pid} on {host} is not running"
        if age > self.stale_after_s:
            return f"the lock of {host} (pid {pid}) has not been refreshed for {age:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the holder; starts the heartbeat thread."""
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a racing launch may take over the stale lock between our read and create
            if self._create():
                break
            holder = self.read()
            if holder and holder.get("host") == self.host and holder.get("pid") == self.pid:
                break  # this process already holds it (a second Trainer in one process, e.g. tests)
            reason = self.stale_reason(holder)
            if reason is None:
                assert holder is not None
                raise UserError(
                    f"the run folder {str(self.path.parent)!r} is in use by another bigtrain run: host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0))))}. "
                    f"Wait for it to finish or stop it, or set run.out_dir to another folder."
                )
            messages.warn(f"note: taking over the run folder lock {self.path} ({reason})")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            raise UserError(f"could not take the run folder lock {self.path}: other launches keep taking it; "
                            f"make sure only one launch uses run.out_dir={str(self.path.parent)!r}.")
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bigtrain-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):  # a full or flaky disk must not kill training from here
                self._refresh()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder and holder.get("host") == self.host and holder.get("pid") == self.pid:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
