"""tests/helpers.py's ``run_distributed``: results in rank order, a failing rank's traceback, timeouts, no orphans."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_distributed


def _all_reduce_rank(rank: int, scale: int) -> dict:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "OMP_NUM_THREADS", "EXTRA")}
    import multiprocessing

    return {"rank": rank, "sum": scale * t.item(), "env": env, "pid": os.getpid(),
            "backend": dist.get_backend(), "world": dist.get_world_size(), "threads": torch.get_num_threads(),
            "start_method": multiprocessing.get_start_method()}


def test_results_come_back_in_rank_order_with_the_torchrun_environment() -> None:
    out = run_distributed(_all_reduce_rank, 3, 10, process_group=True, env={"EXTRA": "x"}, timeout_s=120)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(r["sum"] == 10 * (0 + 1 + 2) for r in out)  # a real collective across the three
    assert all(r["backend"] == "gloo" and r["world"] == 3 and r["threads"] == 1 for r in out)
    # As in a rank torchrun starts: the platform's default start method (DataLoader workers fork), not spawn.
    assert {r["start_method"] for r in out} == {multiprocessing.get_all_start_methods()[0]}
    for rank, r in enumerate(out):
        assert r["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
                            "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "EXTRA": "x"}
    assert len({r["pid"] for r in out} | {os.getpid()}) == 4  # separate processes
    assert "RANK" not in os.environ or os.environ["RANK"] != "2"  # the parent's environment is left alone


def _rank_one_raises(rank: int, pid_dir: str) -> int:
    import torch.distributed as dist

    Path(pid_dir, f"rank{rank}").write_text(str(os.getpid()))
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here for ever: the helper must not
    return rank


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_an_exception_on_one_rank_fails_with_its_traceback(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_distributed(_rank_one_raises, 2, str(tmp_path), process_group=True, timeout_s=120)
    assert time.monotonic() - t0 < 60  # rank 0 (stuck in the barrier) was killed, not waited for
    message = str(info.value)
    assert "failed on rank 1 of 2 (first to fail)" in message and "--- rank 1 of 2" in message
    assert "ValueError: rank one is broken" in message and "_rank_one_raises" in message  # the traceback
    for rank in (0, 1):
        assert not _alive(int((tmp_path / f"rank{rank}").read_text())), f"rank {rank} survived"


def _hang_with_a_child(rank: int, pid_dir: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_dir, f"child{rank}").write_text(str(child.pid))
    Path(pid_dir, f"rank{rank}").write_text(str(os.getpid()))
    time.sleep(600)


def test_a_hang_fails_after_the_timeout_and_leaves_no_process(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 5s; ranks \[0, 1\] still running"):
        run_distributed(_hang_with_a_child, 2, str(tmp_path), timeout_s=5)
    assert time.monotonic() - t0 < 40
    for name in ("rank0", "rank1", "child0", "child1"):
        pid = int((tmp_path / name).read_text())
        deadline = time.monotonic() + 5  # the grandchildren are reaped by init
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"{name} (pid {pid}) is still running"


def _exit_without_result(rank: int) -> None:
    if rank == 0:
        os._exit(7)  # as if killed: no exception to report
    time.sleep(600)


def test_a_rank_that_dies_silently_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"rank 0 of 2:\nexited with status 7 without a result"):
        run_distributed(_exit_without_result, 2, timeout_s=60)
