"""Helpers shared by the tests: CLI/torchrun subprocesses, free ports, in-process training and
``run_distributed``, which runs a function in N spawned gloo ranks and returns their results.

Import them from here (``from tests.helpers import ...``); ``conftest.py`` holds fixtures only.
This module imports neither torch nor bigtrain at import time: the spawned ranks import it first,
before their environment (thread counts, rank variables) is set.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- subprocesses
def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m bigtrain ...` in a subprocess and capture its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``bigtrain.cli.main(args)`` in this process (no interpreter start-up), capturing what it prints.

    The same code path as ``python -m bigtrain`` from argument parsing to the exit status; an
    exception that main() does not turn into a status propagates (so "no traceback" is implied by
    getting a CompletedProcess back). Use ``run_cli`` where the process itself matters (signals,
    imports, the ``python -m`` entry point).
    """
    import io

    import torch

    from bigtrain import messages
    from bigtrain.cli import main

    class Captured(io.StringIO):
        """What a verb prints; ``fileno()`` is the real stream's (faulthandler registers on it)."""

        def __init__(self, real: Any) -> None:
            super().__init__()
            self.real = real

        def fileno(self) -> int:
            return self.real.fileno()

    out, err = Captured(sys.__stdout__), Captured(sys.__stderr__)
    previous_sink = messages.set_sink(None)  # messages go to the (redirected) stdout/stderr
    threads = torch.get_num_threads()  # `train` sets run.num_threads: restored after
    try:
        with _Env(env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        messages.set_sink(previous_sink)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["bigtrain", *args], code, out.getvalue(), err.getvalue())


def run_torchrun(*args: str, nproc: int = 2, timeout: float = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc-per-node=N -m bigtrain ...` (gloo on CPU) and capture output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bigtrain", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all bound at once, so no duplicates)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


# ---------------------------------------------------------------------------------------------- run folders
def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of RUN_DIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> list[dict]:
    """The ``kind: train`` records of RUN_DIR/metrics.jsonl, in order."""
    return [r for r in read_metrics(run_dir) if r.get("kind") == "train"]


# ---------------------------------------------------------------------------------------------- in-process training
def overriding(base: list[str] | tuple[str, ...], *overrides: str) -> list[str]:
    """``base`` overrides with ``overrides`` appended, dropping the base entries for the same keys
    (bigtrain refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def build_trainer(config: str | Path, overrides: list[str] | tuple[str, ...]) -> Any:
    """A Trainer for ``config`` with ``overrides``, built in this process. Its messages go through
    ``bigtrain.messages`` (capture them with ``bigtrain.messages.capture()``)."""
    from bigtrain.config import load_config
    from bigtrain.train.trainer import Trainer

    return Trainer(load_config(config, list(overrides)))


def train(out_dir: Path, *overrides: str, config: str | Path = "configs/debug.yaml",
          after_fit: Callable[[Any], None] | None = None,
          before_fit: Callable[[Any], None] | None = None) -> tuple[dict, list[str]]:
    """Train ``config`` to the end in this process (console logger off); returns (fit's summary, the
    messages it printed). ``before_fit(trainer)`` runs once the trainer is built (to install hooks);
    ``after_fit(trainer)`` runs before torch's thread count (``run.num_threads``) is restored and the
    data pipeline closed."""
    import torch

    from bigtrain import messages

    threads = torch.get_num_threads()
    trainer = None
    try:
        with messages.capture() as lines:
            trainer = build_trainer(config, [f"run.out_dir={out_dir}", *overrides, "log.console=false"])
            if before_fit is not None:
                before_fit(trainer)
            summary = trainer.fit()
            if after_fit is not None:
                after_fit(trainer)
    finally:
        if trainer is not None:
            trainer.loader.close()  # its prefetch thread and DataLoader workers (a process would exit here)
        torch.set_num_threads(threads)
    return summary, lines


SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def record_host_syncs(trainer: Any, monkeypatch: Any) -> dict[int, int]:
    """Count, per training step, bigtrain's own calls of the tensor methods that force a host-device
    sync (``.item()``, ``float(t)``, ``bool(t)``, ...) while ``trainer`` runs; step 0 = set-up.

    Only bigtrain's code counts: torch's foreach AdamW reads its step counter with .item(), but
    that counter is a host tensor (no device sync), and the fused AdamW used on CUDA does not call
    it. Undo with ``monkeypatch.undo()`` (pytest does at the end of the test)."""
    import torch

    current = {"step": 0}
    syncs: dict[int, int] = {}
    original_step = trainer.train_step

    def train_step():  # type: ignore[no-untyped-def]
        current["step"] = trainer.step + 1  # syncs until the next step belong to this one
        return original_step()

    monkeypatch.setattr(trainer, "train_step", train_step)
    bigtrain_dir = str(REPO / "bigtrain")
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def recorder(self, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            if bigtrain_dir in sys._getframe(1).f_code.co_filename:
                syncs[current["step"]] = syncs.get(current["step"], 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorder)
    return syncs


# ---------------------------------------------------------------------------------------------- run_distributed
class _Env:
    """Set environment variables for the duration of a block (spawned children inherit them)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies (no orphans if pytest is killed)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_main(payload: bytes, rank: int, world_size: int, process_group: bool, pg_timeout_s: float,
               results: Any, env: dict[str, str]) -> None:
    """Entry point of one rank: its environment, own process group (so the parent can kill it with its
    children), stack dumps on SIGUSR2, optional gloo group, then ``fn(rank, *args)``."""
    os.setsid()
    _die_with_parent()
    os.environ.update(env)  # forked from the fork server, which holds the environment it started with
    if "OMP_NUM_THREADS" in env:
        import torch  # preloaded: OpenMP read OMP_NUM_THREADS when the fork server loaded it

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    import faulthandler
    import multiprocessing

    # A spawned child inherits "spawn" as its start method; a torchrun-launched rank has the platform's
    # default (fork on Linux), and DataLoader workers would otherwise re-import torch (seconds each).
    multiprocessing.set_start_method(None, force=True)

    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    try:
        fn, args = pickle.loads(payload)  # imports the test module (and torch) only now
        dist = None
        if process_group:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = pickle.dumps(fn(rank, *args))
        if dist is None:
            import torch.distributed as dist  # the function's code may have created one (a Trainer does)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # nobody tears the store down under a rank that is still finishing
            dist.destroy_process_group()
        results.put((rank, "ok", result))
    except BaseException:  # also SystemExit/KeyboardInterrupt: reported to the parent, never swallowed
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)  # no clean-up that could block on a collective the other ranks never join


def _kill(proc: Any) -> None:
    """SIGKILL a rank and everything it started (it leads its own process group once started)."""
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    proc.join(timeout=10)


_SESSION_ENV = dict(os.environ)  # at collection, before any test runs (conftest has set its defaults)


def _rank_context() -> Any:
    """Ranks are forked from a fork server that has imported torch once (importing it costs every rank seconds
    of CPU otherwise); the server is a fresh single-threaded process, so forking it is safe, and it is started
    before any rank's environment is set (ranks set theirs themselves)."""
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    # The server keeps the environment it starts with: the session's, not that of the test that needs it
    # first (which may have changed variables for itself).
    current = dict(os.environ)
    os.environ.clear()
    os.environ.update(_SESSION_ENV)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(current)
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300,
                    env: dict[str, str] | None = None, process_group: bool = False) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes; return the results in rank order.

    Each rank sees the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port) and OMP_NUM_THREADS=1, plus ``env``.
    ``process_group=True`` initializes a gloo process group there first (a ``Trainer`` creates its
    own from that environment, so leave it False for those). ``fn`` and ``args`` must be
    picklable (``fn`` a module-level function of an importable module) and so must the results.

    A rank that raises fails the test with that rank's traceback; a rank that dies without a
    result, or any rank still running after ``timeout_s`` (stacks dumped first), fails it too.
    Every rank, and whatever it started, is killed before this returns or raises.
    """
    import pytest

    ctx = _rank_context()
    results = ctx.Queue()
    payload = pickle.dumps((fn, args))
    port = str(free_port())
    procs = []
    start = time.monotonic()
    try:
        for rank in range(world_size):
            rank_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {}), "RANK": str(rank),
                        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            proc = ctx.Process(target=_rank_main, name=f"rank{rank}",
                               args=(payload, rank, world_size, process_group, timeout_s, results, rank_env))
            proc.start()
            procs.append(proc)

        done: dict[int, Any] = {}
        errors: dict[int, str] = {}
        gone_at: dict[int, float] = {}
        while len(done) < world_size and not errors:
            try:
                rank, status, value = results.get(timeout=0.1)
            except queue.Empty:
                now = time.monotonic()
                for rank, proc in enumerate(procs):
                    # Its result may still be in the pipe: allow a moment before calling it lost.
                    if (rank not in done and proc.exitcode is not None
                            and now - gone_at.setdefault(rank, now) > 2.0):
                        errors[rank] = f"exited with status {proc.exitcode} without a result (killed or crashed)"
                if not errors and now - start > timeout_s:
                    running = [r for r in range(world_size) if r not in done]
                    for r in running:  # where was it? (faulthandler, to the test's captured stderr)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(procs[r].pid, signal.SIGUSR2)
                    time.sleep(1.0)
                    pytest.fail(f"run_distributed: {fn.__name__} timed out after {timeout_s:.0f}s; ranks "
                                f"{running} still running (their stacks are in the captured stderr)", pytrace=False)
                continue
            if status == "ok":
                done[rank] = pickle.loads(value)
            else:
                errors[rank] = value
        if errors:
            first = next(iter(errors))
            with contextlib.suppress(queue.Empty):  # other ranks' reports that already arrived (often echoes)
                while True:
                    rank, status, value = results.get(timeout=0.2)
                    if status == "error":
                        errors.setdefault(rank, value)
            report = "\n".join(f"--- rank {r} of {world_size}:\n{tb}" for r, tb in errors.items())  # first first
            pytest.fail(f"run_distributed: {fn.__name__} failed on rank {first} of {world_size} (first to fail)\n"
                        f"{report}", pytrace=False)
        for proc in procs:  # every rank reported: let them finish exiting (a stuck exit is killed below)
            proc.join(timeout=30)
        return [done[r] for r in range(world_size)]
    finally:
        for proc in procs:
            if proc.exitcode is None:
                _kill(proc)
            else:
                proc.join()
        results.close()
        results.cancel_join_thread()


# ---------------------------------------------------------------------------------------------- one-process CLI runs
def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of the train records in ``run_dir``'s metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def status(run_dir: Path) -> dict:
    """``run_dir``'s status.json."""
    return json.loads((run_dir / "status.json").read_text())
