"""Peer heartbeats (train/peers.py) on a real TCPStore in this process."""
from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from bigtrain.train.peers import PeerHeartbeat, beat_interval

INTERVAL = 0.2  # the watch window is 2.5 beats: 0.5 s, ample for a beat thread on a busy machine


@pytest.fixture()
def master() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def client(master: dist.TCPStore) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", master.port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def heartbeat(master: dist.TCPStore, rank: int, world: int = 4) -> PeerHeartbeat:
    return PeerHeartbeat(rank, world, INTERVAL, client(master), ("127.0.0.1", master.port))


def test_names_silent_never_seen_and_lagging_peers(master: dist.TCPStore) -> None:
    me, dead, lagging = heartbeat(master, 0), heartbeat(master, 1), heartbeat(master, 2)
    me.step, lagging.step = 5, 3
    dead.step = 7
    assert dead.beat_once()  # one beat, then nothing: died (or hangs) at step 7
    with me, lagging:
        time.sleep(2 * INTERVAL)
        lines = me.describe_peers()
    assert len(lines) == 3, lines
    assert lines[0].startswith("rank 1 (host ") and "is silent" in lines[0] and "at step 7 (training)" in lines[0]
    assert lines[1] == "never reported a heartbeat: rank 3"
    assert lines[2].startswith("rank 2 (host ") and lines[2].endswith("is alive at step 3")


def test_failed_peers_keep_beating_and_finished_ones_are_not_silent(master: dist.TCPStore) -> None:
    me, failing, finished = heartbeat(master, 0, 3), heartbeat(master, 1, 3), heartbeat(master, 2, 3)
    with finished:
        pass  # a clean exit stops its beats: it is done, not dead
    with pytest.raises(RuntimeError), failing:
        raise RuntimeError("a collective failed")
    assert failing.state == "failed" and failing._thread.is_alive()  # still beating for the others
    with me:
        lines = me.describe_peers()
    assert lines == [("every other rank is alive (heartbeats from all 2 peers): "
                      "the failure is probably in the collective itself or in this rank")], lines


def test_unreachable_store_is_reported() -> None:
    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    me = heartbeat(host, 0, 2)
    del host  # the process hosting the store died
    lines = me.describe_peers(watch_s=0)
    assert len(lines) == 1 and lines[0].startswith("could not read the peers' heartbeats from the store at"), lines


def test_from_env(master: dist.TCPStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    assert PeerHeartbeat.from_env(0, 1, 600) is None  # one rank: nobody to tell
    hb = PeerHeartbeat.from_env(1, 2, 600)
    assert hb is not None and hb.interval_s == beat_interval(600) == 5.0
    assert hb.beat_once() and master.check([hb._key(1)])
    monkeypatch.delenv("MASTER_PORT")
    assert PeerHeartbeat.from_env(1, 2, 600) is None  # no launcher store


def test_beat_interval_bounds() -> None:
    assert beat_interval(20) == 1.0 and beat_interval(1) == 0.5 and beat_interval(1800) == 5.0
