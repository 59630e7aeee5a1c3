"""Peer heartbeats: the ranks that survive a failure say which rank went silent.

When a rank dies or hangs, the others only learn that a collective failed: gloo names a socket
address, NCCL a timeout. So every rank of a multi-rank run publishes a small heartbeat (a
sequence number, its step, host, pid and state) to the launcher's key-value store (the TCPStore at
MASTER_ADDR:MASTER_PORT that torchrun, ``accelerate launch`` or a hand launch already run) from a
daemon thread. A rank that fails on a collective (or whose watchdog fires) watches the heartbeats
for a few beats and names the peers whose sequence did not advance - dead or hung - and the live
peers that are at another step:

    bigtrain: rank 0 of 8: rank 5 (host node2, pid 4242) is silent: last heard 9s ago, at step 1200

The thread keeps beating after this rank's own failure (state ``failed``), so survivors that fail
at the same time do not name each other. It costs one small store write per interval per rank
and nothing in the step loop (the step number is a plain attribute).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

KEY_PREFIX = "bigtrain/heartbeat"
MAX_NAMED = 8  # peers named in one report; a 1000-rank job lists the first ones and a count


def beat_interval(timeout_s: float) -> float:
    """Seconds between beats: well inside the collective timeout, but no busier than needed."""
    return min(5.0, max(0.5, timeout_s / 20))


@dataclass
class PeerBeat:
    rank: int
    seq: int
    step: int
    host: str
    pid: int
    state: str
    time: float  # this rank's wall clock when it wrote the beat


class PeerHeartbeat:
    """Publishes this rank's heartbeat; :meth:`describe_peers` tells who stopped beating."""

    def __init__(self, rank: int, world_size: int, interval_s: float, store: Any,
                 address: tuple[str, int]) -> None:
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.store, self.address = store, address
        self.where = f"the store at {address[0]}:{address[1]}"
        self.step = 0
        self.state = "training"
        self._seq = 0
        self._lock = threading.Lock()  # one store client, used by the beat thread and the reporter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bigtrain-heartbeat", daemon=True)
        # A key per launcher restart: torchrun --max-restarts keeps its store across restarts.
        self._prefix = f"{KEY_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    @classmethod
    def from_env(cls, rank: int, world_size: int, timeout_s: float) -> PeerHeartbeat | None:
        """A client of the launcher's TCPStore (MASTER_ADDR:MASTER_PORT); None for one rank or no store."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size <= 1 or not host or not port:
            return None
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10),
                                  wait_for_workers=False)
        except (RuntimeError, ValueError, OSError):
            return None  # no store to share: failures are still reported, without naming peers
        return cls(rank, world_size, beat_interval(timeout_s), store, (host, int(port)))

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    # ------------------------------------------------------------------ publishing
    def __enter__(self) -> PeerHeartbeat:
        self.beat_once()  # a first beat before any collective can fail
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.state = "finished"
            self._stop.set()
            self.beat_once()  # tell the peers: done, not dead
        else:  # keep beating until the process exits, so failing peers do not look dead to each other
            self.state = "failed"

    def beat_once(self) -> bool:
        try:
            with self._lock:  # the thread and __exit__ both beat: one sequence, in order
                self._seq += 1
                value = json.dumps({"seq": self._seq, "step": self.step, "host": socket.gethostname(),
                                    "pid": os.getpid(), "state": self.state, "time": time.time()})
                self.store.set(self._key(self.rank), value)
            return True
        except Exception:
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.beat_once():
                return

    # ------------------------------------------------------------------ reading
    def read(self, ranks: list[int]) -> dict[int, PeerBeat | None]:
        """The newest beat of each rank (None: never reported). Raises when the store is unreachable."""
        out: dict[int, PeerBeat | None] = {}
        with self._lock:
            for r in ranks:
                key = self._key(r)
                if not self.store.check([key]):
                    out[r] = None
                    continue
                out[r] = PeerBeat(rank=r, **json.loads(self.store.get(key)))
        return out

    def describe_peers(self, watch_s: float | None = None) -> list[str]:
        """Lines naming silent peers (no beat for ``watch_s``) and live ones at another step.

        Waits ``watch_s`` (default 2.5 beats) to tell a dead or hung peer from a slow one.
        """
        watch_s = 2.5 * self.interval_s if watch_s is None else watch_s
        peers = [r for r in range(self.world_size) if r != self.rank]
        try:
            # A plain connection first: a store op on a dead server logs a C++ stack trace before it raises.
            socket.create_connection(self.address, timeout=5).close()
            self.store.set_timeout(datetime.timedelta(seconds=5))
            before = self.read(peers)
            time.sleep(watch_s)
            after = self.read(peers)
        except Exception as exc:
            return [(f"could not read the peers' heartbeats from {self.where} ({type(exc).__name__}); the process "
                     f"hosting it (rank 0 of a hand launch, or the torchrun agent on the first node) probably died")]
        now = time.time()
        silent, never, behind = [], [], []
        for r in peers:
            old, new = before[r], after[r]
            if new is None:
                never.append(r)
            elif old is not None and new.seq == old.seq and new.state != "finished":
                silent.append(f"rank {r} (host {new.host}, pid {new.pid}) is silent: last heard "
                              f"{max(0.0, now - new.time):.0f}s ago, at step {new.step} ({new.state})")
            elif new.step != self.step and new.state == "training":
                behind.append(f"rank {r} (host {new.host}, pid {new.pid}) is alive at step {new.step}")
        lines = _capped(silent, "silent peers")
        if never:
            lines.append(f"never reported a heartbeat: rank{'s' if len(never) > 1 else ''} {_ranks(never)}")
        lines += _capped(behind, "live peers at another step")
        if not lines:
            lines.append(f"every other rank is alive (heartbeats from all {len(peers)} peers): "
                         f"the failure is probably in the collective itself or in this rank")
        return lines


def _capped(lines: list[str], what: str) -> list[str]:
    if len(lines) <= MAX_NAMED:
        return lines
    return [*lines[:MAX_NAMED], f"... and {len(lines) - MAX_NAMED} more {what}"]


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:MAX_NAMED]))
    return shown + (f" and {len(ranks) - MAX_NAMED} more" if len(ranks) > MAX_NAMED else "")


# The heartbeat of this process's run, for the failure reporters (CLI, watchdog) that have no trainer.
_current: PeerHeartbeat | None = None


def set_current(heartbeat: PeerHeartbeat | None) -> None:
    global _current
    _current = heartbeat


def describe_current_peers() -> list[str]:
    """What the running heartbeat knows about the peers; nothing when there is none."""
    return _current.describe_peers() if _current is not None else []
