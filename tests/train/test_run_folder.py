"""One run per folder (the run lock), and a failed start changes nothing (issue: hardening §1-2)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigtrain import messages
from bigtrain.errors import UserError
from bigtrain.train.run_lock import LOCK_FILE, RunLock
from tests.helpers import build_trainer, train

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=2",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "checkpoint.at_end=true", "run.device=cpu", "log.console=false")


@pytest.fixture
def other_process() -> int:
    """The PID of a live process that is not this one (a lock holder that is still running)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _plant_lock(run_dir: Path, *, host: str, pid: int, heartbeat_age_s: float = 0.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": now - 100,
                                                 "heartbeat": now - heartbeat_age_s}))


# ---------------------------------------------------------------------------------------------- RunLock
def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path, other_process: int) -> None:
    _plant_lock(tmp_path, host=socket.gethostname(), pid=other_process)
    with pytest.raises(UserError, match=f"in use by another bigtrain run: host {socket.gethostname()}, "
                                        f"pid {other_process}"):
        RunLock(tmp_path).acquire()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_note(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _plant_lock(tmp_path, host=socket.gethostname(), pid=int(dead.stdout))
    lock = RunLock(tmp_path)
    with messages.capture() as lines:
        lock.acquire()
    try:
        assert any("taking over" in line and "is not running" in line for line in lines), lines
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_on_another_host_is_held_while_its_heartbeat_is_fresh_and_taken_when_stale(tmp_path: Path) -> None:
    _plant_lock(tmp_path, host="node-17", pid=4242, heartbeat_age_s=5)
    with pytest.raises(UserError, match="host node-17, pid 4242"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    _plant_lock(tmp_path, host="node-17", pid=4242, heartbeat_age_s=120)  # the node died: no heartbeat
    lock = RunLock(tmp_path, stale_after_s=60)
    with messages.capture() as lines:
        lock.acquire()
    lock.release()
    assert any("has not been refreshed" in line for line in lines), lines


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.time() + 5
        while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------- the trainer
def test_a_second_run_into_a_held_folder_is_refused_and_changes_nothing(tmp_path: Path, demo_data: Path,
                                                                         other_process: int) -> None:
    run = tmp_path / "run"
    _plant_lock(run, host=socket.gethostname(), pid=other_process)
    with pytest.raises(UserError, match=f"pid {other_process}"):
        build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY])
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # no config.yaml, no metrics.jsonl


def test_a_finished_run_releases_its_lock(tmp_path: Path, demo_data: Path) -> None:
    train(tmp_path / "run", *TINY)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_a_failed_start_leaves_no_new_run_folder(tmp_path: Path, demo_data: Path) -> None:
    hf = tmp_path / "not_hf"
    hf.mkdir()  # no config.json: model.init_from fails after the folder was created and locked
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"no config\.json"):
        build_trainer("configs/debug.yaml", [f"run.out_dir={run}", f"model.init_from={hf}", *TINY])
    assert not run.exists()


def test_a_refused_resume_keeps_the_runs_config(tmp_path: Path, demo_data: Path) -> None:
    run = tmp_path / "run"
    train(run, *TINY)
    before = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="model architecture changed"):
        build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY, "checkpoint.resume=auto",
                                             "model.num_layers=3"])
    assert (run / "config.yaml").read_text() == before
    assert not (run / LOCK_FILE).exists()  # the refused start released the lock
    assert run.is_dir()  # an existing run folder is never removed


def test_a_validation_split_shorter_than_one_batch_is_found_before_the_folder(tmp_path: Path,
                                                                               demo_data: Path) -> None:
    run = tmp_path / "run"
    # The demo's validation split holds 162,745 tokens: not one batch of 1024 x 256.
    with pytest.raises(UserError, match="fewer than one evaluation batch per rank"):
        build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY, "eval.at_end=true", "data.seq_len=256",
                                             "train.micro_batch_size=1024", "train.global_batch_tokens=262144"])
    assert not run.exists()
    # Without any evaluation the split is not needed, and the same settings start.
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY, "data.seq_len=256",
                                                   "train.micro_batch_size=1024", "train.global_batch_tokens=262144"])
    trainer.run_lock.release()


def test_a_broken_source_file_is_found_before_the_folder(tmp_path: Path, demo_data: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text('{"text": "a fine document"}\n' * 10)
    (raw / "bad.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"bad\.jsonl"):
        build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY, "data.train_path=",
                                             f"data.sources=[{{kind: jsonl, paths: ['{raw}']}}]"])
    assert not run.exists()


# ---------------------------------------------------------------------------------------------- hostile files
# Valid JSON of the wrong types, as a hand edit or a broken tool leaves it (issue: hardening II §4).
BAD_RECORDS = [
    {"host": "h", "pid": 10 ** 20, "started": 1.0, "heartbeat": 1.0},
    {"host": "h", "pid": 123, "started": "yesterday", "heartbeat": "now"},
    {"host": ["h"], "pid": True, "started": None, "heartbeat": 1e309},
    {"host": "h", "pid": -5, "started": 1.0, "heartbeat": float("nan")},
    ["not", "a", "mapping"],
    "a string",
]


@pytest.mark.parametrize("record", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_lock_of_the_wrong_types_is_taken_over_not_a_crash(tmp_path: Path, record: object) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    lock = RunLock(tmp_path)
    assert lock.read() is None  # names nobody
    with messages.capture() as lines:
        lock.acquire()
    try:
        assert any("taking over" in line and "unreadable lock file" in line for line in lines), lines
    finally:
        lock.release()


STATUS_FIELDS = [
    {"status": "running", "pid": 10 ** 20, "hostname": socket.gethostname(), "step": "3", "updated_time": "noon",
     "wall_time_s": "long", "first_start_time": "then", "loss": float("inf"), "tokens": [1]},
    {"status": 5, "name": {"a": 1}, "last_checkpoint": 7, "max_steps": 1.5, "val_bpb": "x", "start_time": None},
    [1, 2, 3],
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A folder with two finished runs, "good" and "bad" (trained once; each test works on a copy)."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("good", "bad"):
        train(root / name, *TINY)
    return root


@pytest.mark.parametrize("fields", STATUS_FIELDS, ids=range(len(STATUS_FIELDS)))
def test_runs_lists_every_folder_when_one_status_has_the_wrong_types(tmp_path: Path, two_runs: Path,
                                                                     fields: object) -> None:
    """One bad status.json cannot take the whole `bigtrain runs` listing down, nor a resume=auto of that run."""
    import shutil

    from tests.helpers import cli

    shutil.copytree(two_runs, tmp_path, dirs_exist_ok=True)
    bad = tmp_path / "bad"
    (bad / "status.json").write_text(json.dumps(fields))
    listing = cli("runs", str(tmp_path))
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stdout + listing.stderr
    rows = listing.stdout.splitlines()
    assert any(row.startswith("good ") for row in rows) and any(row.startswith("bad ") for row in rows), rows
    assert cli("runs", str(tmp_path), "--json").returncode == 0
    _, lines = train(bad, *TINY, "train.max_steps=3", "checkpoint.resume=auto")
    assert any("resumed from" in line for line in lines), lines
