"""One `bigtrain data prepare` per output folder (issue 28): a second prepare into the same ``--out-dir`` is refused
at once, naming the holder, and leaves the first one's build alone; a lock whose holder is gone is taken over.

Before the lock, two prepares shared ``OUT.partial``: one deleted or resumed the other's build, both could print
``done`` while the published folder had no ``tokenizer.json``, and a ``FileExistsError`` could escape.

The running prepare below is a real one in another process (``python -m bigtrain``'s ``main``), paused while it holds
the lock with its build half done: a tokenizer in ``OUT.partial``, no shards yet. The pause makes the test
deterministic where an input "large enough to take a few seconds" would race the second prepare.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigtrain.data.prepare import LOCK_STALE_AFTER_S, LOCK_UNREADABLE_AFTER_S, OutputLock
from bigtrain.data.shards import verify_prepared
from tests.helpers import REPO, cli

# Runs `bigtrain ARGS...` (argv[3:]) with the tokenization paused until the file argv[2] exists; argv[1] is
# created when the pause begins (the lock is held and OUT.partial holds the tokenizer).
PAUSED_PREPARE = """
import sys, time
from pathlib import Path
import bigtrain.data.prepare as prep

paused, go = Path(sys.argv[1]), Path(sys.argv[2])
real = prep.tokenize_to_shards

def tokenize_when_told(*args, **kwargs):
    paused.touch()
    while not go.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)

prep.tokenize_to_shards = tokenize_when_told
from bigtrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(200)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as fh:
        for _ in range(300):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))}) + "\n")
    return folder


def _prepare_args(corpus: Path, out: Path, demo_data: Path) -> list[str]:
    return ["data", "prepare", str(corpus), "--out-dir", str(out), "--tokenizer", str(demo_data / "tokenizer.json"),
            "--num-workers", "1", "--shard-tokens", "500"]


def _start_paused(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """A prepare in another process, returned once it holds the lock and waits; touch the returned path to go on."""
    paused, go = tmp_path / "paused", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_PREPARE, str(paused), str(go), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not paused.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the first prepare did not reach its pause (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    return proc, go


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bigtrain: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_second_prepare_is_refused_naming_the_holder_and_the_first_completes(
        corpus: Path, tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "out"
    partial, lock = tmp_path / "out.partial", tmp_path / "out.lock"
    args = _prepare_args(corpus, out, demo_data)
    first, go = _start_paused(tmp_path, args)
    try:
        before = _files(partial)
        assert "tokenizer.json" in before and lock.is_file()
        t0 = time.monotonic()
        second = cli(*args, "--overwrite")  # not even --overwrite replaces a build in progress
        error = _error_line(second)
        assert time.monotonic() - t0 < 30  # refused at once, not after its own scan or build
        assert f"host {socket.gethostname()}, pid {first.pid}," in error and str(lock) in error, error
        assert "another `bigtrain data prepare`" in error
        assert _files(partial) == before and not out.exists()  # the first one's files are untouched
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"prepare: done -> {out}" in stdout
    assert (out / "tokenizer.json").is_file() and (out / "manifest.json").is_file()
    verify_prepared(out)  # complete: every shard the manifest lists, of the tokenizer it names
    assert not partial.exists() and not lock.exists()
    assert cli(*args).returncode == 2  # the finished output is protected as before (no --overwrite) ...
    assert not lock.exists()  # ... and a refused prepare leaves no lock behind


def test_the_lock_of_a_killed_prepare_is_taken_over_with_a_note(corpus: Path, tmp_path: Path,
                                                                demo_data: Path) -> None:
    out, lock = tmp_path / "out", tmp_path / "out.lock"
    args = _prepare_args(corpus, out, demo_data)
    killed, _ = _start_paused(tmp_path, args)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)  # reaped: its pid no longer runs
    assert json.loads(lock.read_text())["pid"] == killed.pid  # left behind, as after a crash
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "taking over the output lock" in line]
    assert len(notes) == 1 and f"process {killed.pid} on {socket.gethostname()} is not running" in notes[0]
    assert "resuming the interrupted build" in result.stdout  # its tokenizer, saved before the kill, is reused
    verify_prepared(out)
    assert not lock.exists() and not (tmp_path / "out.partial").exists()


def _write_lock(lock: Path, *, host: str, pid: int, age_s: float) -> None:
    """The record a prepare on ``host`` writes, last refreshed ``age_s`` seconds ago."""
    now = time.time()
    lock.write_text(json.dumps({"host": host, "pid": pid, "started": now - age_s - 60, "heartbeat": now - age_s,
                                "out": str(lock.with_suffix(""))}))


def test_another_hosts_lock_is_refused_while_it_beats_and_taken_over_once_it_stopped(
        corpus: Path, tmp_path: Path, demo_data: Path) -> None:
    out, lock = tmp_path / "out", tmp_path / "out.lock"
    args = _prepare_args(corpus, out, demo_data)
    _write_lock(lock, host="node-other", pid=4242, age_s=5)
    error = _error_line(cli(*args))
    assert "host node-other, pid 4242," in error and lock.is_file() and not out.exists()
    _write_lock(lock, host="node-other", pid=4242, age_s=LOCK_STALE_AFTER_S + 30)
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "node-other (pid 4242) has not been refreshed" in result.stderr
    verify_prepared(out)
    assert not lock.exists()


def test_an_unreadable_lock_is_refused_while_new_and_taken_over_when_old(
        corpus: Path, tmp_path: Path, demo_data: Path) -> None:
    out, lock = tmp_path / "out", tmp_path / "out.lock"
    args = _prepare_args(corpus, out, demo_data)
    lock.write_text("")
    assert "unreadable" in _error_line(cli(*args))
    old = time.time() - LOCK_UNREADABLE_AFTER_S - 5
    os.utime(lock, (old, old))
    result = cli(*args)
    assert result.returncode == 0 and "its lock file is unreadable" in result.stderr, result.stderr
    verify_prepared(out)


def test_the_holder_refreshes_its_heartbeat_and_removes_only_its_own_lock(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path / "out", heartbeat_s=0.05)
    with lock:
        first = json.loads(lock.path.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock.path.read_text())["heartbeat"] > first
        _write_lock(lock.path, host="node-other", pid=4242, age_s=0)  # taken over meanwhile (it looked gone)
        time.sleep(0.2)
        assert json.loads(lock.path.read_text())["host"] == "node-other"  # never written over
    assert lock.path.is_file()  # not ours: left to its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.lock"]  # no scratch files either
