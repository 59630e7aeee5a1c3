"""The run folder is prepared by every rank at once; the preparation must not race with itself."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from bigtrain.train.run_lock import LOCK_FILE, RunLock
from bigtrain.train.trainer import Trainer


def _bare_trainer(run_dir: Path, rank: int) -> Trainer:
    """Just the attributes ``_prepare_run_dir`` reads (a full Trainer builds a model and data)."""
    trainer = Trainer.__new__(Trainer)
    trainer.run_dir = run_dir
    trainer.info = SimpleNamespace(rank=rank, is_main=rank == 0)
    trainer.cfg = SimpleNamespace(to_yaml=lambda: "run: {}\n")
    trainer.run_lock = RunLock(run_dir)  # rank 0 takes the run folder's lock
    return trainer


def test_ranks_preparing_one_run_folder_at_once_all_succeed(tmp_path: Path) -> None:
    # CI once failed a 2-rank run with "cannot write to the run folder (No such file or directory)":
    # both ranks used one probe file name and one unlinked it under the other.
    run_dir = tmp_path / "run"
    ranks, rounds = 8, 200
    errors: list[BaseException] = []
    start = threading.Barrier(ranks)

    trainers = [_bare_trainer(run_dir, rank) for rank in range(ranks)]

    def prepare(rank: int) -> None:
        trainer = trainers[rank]
        start.wait()
        try:
            for _ in range(rounds):
                trainer._prepare_run_dir()
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no probe left behind
    trainers[0].run_lock.release()
    assert list(run_dir.iterdir()) == []
