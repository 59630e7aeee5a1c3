"""Observability end to end: step-time breakdown, status.json, profiler, TensorBoard, W&B offline
(no network) and online without a key, `bigtrain plot` and `bigtrain runs`.

Two tiny CPU runs (1 layer, dim 64, 6 steps; `bigtrain train` through ``bigtrain.cli.main`` in this
process) are shared by the tests of this module. The breakdown on two ranks (collectives) is
checked on the DDP run of tests/e2e/test_backends_cli.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, build_trainer, cli, overriding

TINY = ["model.num_layers=1", "model.dim=64", "train.max_steps=6", "train.global_batch_tokens=1024",
        "train.micro_batch_size=4", "train.lr_warmup_steps=2", "log.every_steps=2", "eval.every_steps=3",
        "eval.max_batches=1", "eval.final_max_batches=1", "log.sample_at_end=false", "run.num_threads=1"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


class Listener:
    """A local TCP server that counts connections: anything that tries to reach W&B (or any HTTP
    proxy) is pointed here, so 'no network touched' is checked rather than assumed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close()

    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        return {"WANDB_BASE_URL": url, "HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url,
                "https_proxy": url, "NO_PROXY": "", "no_proxy": ""}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, Path]:
    """runs/a: checkpoints, TensorBoard and a profiler window; runs/b: W&B offline, then resumed."""
    root = tmp_path_factory.mktemp("obs") / "runs"
    a, b = root / "a", root / "b"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={a}", "run.name=alpha", *TINY,
               "checkpoint.every_steps=2", "log.tensorboard=true", "log.profile.steps=[2,3]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listener = Listener()
    try:
        env = {**listener.env(), "WANDB_MODE": "offline", "WANDB_API_KEY": "", "HOME": str(root.parent)}
        proc = cli("train", "configs/debug.yaml", f"run.out_dir={b}", "run.name=beta", *TINY,
                   "log.wandb.mode=offline", "log.wandb.tags=[ci,tiny]", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first_id = (b / "wandb_run_id").read_text().strip()
        b_losses = train_losses(b)
        # Resume from the end-of-run checkpoint for two more steps: the same W&B run continues.
        proc = cli("train", "configs/debug.yaml", f"run.out_dir={b}", "run.name=beta",
                   *overriding(TINY, "train.max_steps=8"), "checkpoint.resume=auto", "log.wandb.mode=offline", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "resumed from" in proc.stdout
    finally:
        listener.close()
    assert listener.connections == 0, "W&B offline (or something else) tried to reach the network"
    assert (b / "wandb_run_id").read_text().strip() == first_id
    (b / "first_losses.json").write_text(json.dumps(b_losses))
    return {"root": root, "a": a, "b": b}


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_breakdown_sums_to_step_time(runs: dict[str, Path]) -> None:
    train = [r for r in read_metrics(runs["a"]) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    parts = ("data_wait_s", "fwd_bwd_s", "optimizer_s", "checkpoint_stall_s", "collectives_s")
    for r in train:
        assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 and r["data_wait_s"] >= 0 and r["host_rss_gib"] > 0
        total = sum(r.get(k, 0.0) for k in parts)
        # Windows include an evaluation (step 3, subtracted), checkpoint stalls (saved at 2 and 4) and
        # the profiler window (steps 2-3; its start/stop time is kept out of step time).
        assert abs(total - r["step_time_s"]) <= 0.10 * r["step_time_s"], (r["step"], total, r["step_time_s"])
    by_step = {r["step"]: r for r in train}
    assert "checkpoint_stall_s" not in by_step[2]  # the first save happens after step 2's log line
    assert by_step[4]["checkpoint_stall_s"] > 0 and by_step[6]["checkpoint_stall_s"] > 0
    assert "collectives_s" not in by_step[2]  # one process: nothing to communicate


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_status_profile_and_tensorboard(runs: dict[str, Path]) -> None:
    a = runs["a"]
    status = json.loads((a / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 6 and status["tokens"] == 6 * 1024
    assert status["val_bpb"] > 0 and status["last_checkpoint"].endswith("step_000006") and status["wall_time_s"] > 0
    profile = sorted(p.name for p in (a / "profile").iterdir())
    assert profile == ["ops_steps_2-3.txt", "trace_steps_2-3.json"]
    trace = json.loads((a / "profile" / "trace_steps_2-3.json").read_text())
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_wandb_offline_run_lives_in_the_run_folder(runs: dict[str, Path]) -> None:
    b = runs["b"]
    run_id = (b / "wandb_run_id").read_text().strip()
    offline = sorted((b / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)  # first run + resumed run
    for p in offline:
        (records,) = p.glob("*.wandb")  # W&B's record log: the config and the history rows
        data = records.read_bytes()
        assert b"global_batch_tokens" in data  # the resolved config was uploaded
        assert b"train/loss" in data and b"train/fwd_bwd_s" in data and b"eval/val_bpb" in data
    # Training is unaffected by W&B: the same losses as run a (same seed and data, other loggers).
    assert json.loads((b / "first_losses.json").read_text()) == {str(k): v for k, v in train_losses(runs["a"]).items()}
    status = json.loads((b / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 8


def test_wandb_online_without_key_fails_fast(tmp_path: Path, demo_data: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "NETRC")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", "configs/debug.yaml", f"run.out_dir={out}",
                           "log.wandb.mode=online", *TINY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "no W&B API key" in proc.stderr and "wandb login" in proc.stderr
    assert elapsed < 5, elapsed
    assert not out.exists()  # stopped before the run folder (and any model) was made


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_plot_two_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "compare.png"
    proc = cli("plot", str(runs["a"]), str(runs["b"]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 30_000
    pixels = matplotlib.image.imread(str(out))[..., :3]
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.02 < non_white < 0.6, non_white
    # Both runs are drawn: matplotlib's first two cycle colors (C0 blue, C1 orange) appear.
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = (abs(pixels - [c / 255 for c in rgb]) < 0.03).all(axis=-1)
        assert close.sum() > 200, rgb


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_plot_and_runs_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = cli("plot", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("plot", str(runs["a"]), "-o", str(tmp_path / "x.bmpx"))
    assert proc.returncode == 2 and "unknown image format" in proc.stderr
    proc = cli("runs", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    proc = cli("runs", str(tmp_path))
    assert proc.returncode == 0 and "no runs under" in proc.stdout


@pytest.mark.slow  # shares the module's ~30 s of tiny training runs
def test_runs_table_shows_each_status(runs: dict[str, Path], tmp_path: Path, demo_data: Path) -> None:
    from bigtrain.train.status import write_status

    root = tmp_path / "runs"
    shutil.copytree(runs["a"], root / "a", ignore=shutil.ignore_patterns("checkpoints", "profile", "tensorboard"))
    # Preempted: what the launch code writes when it exits on SIGTERM/SIGUSR1.
    shutil.copytree(runs["a"], root / "pre", ignore=shutil.ignore_patterns("checkpoints", "profile", "tensorboard"))
    write_status(root / "pre", "preempted", step=4)
    # Stale: status says running but its process is gone (SIGKILL, OOM) -> shown as failed.
    shutil.copytree(runs["a"], root / "nested" / "killed",
                    ignore=shutil.ignore_patterns("checkpoints", "profile", "tensorboard"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_status(root / "nested" / "killed", "running", pid=int(dead.stdout))
    status = json.loads((root / "nested" / "killed" / "status.json").read_text())
    status["pid"] = int(dead.stdout)  # write_status stamps our pid; pretend another process wrote it
    (root / "nested" / "killed" / "status.json").write_text(json.dumps(status))
    # Failed: an exception escapes fit (in process, so it can be injected).
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={root / 'crash'}", *TINY, "log.console=false"])
    original = trainer.train_step

    def failing_step():  # type: ignore[no-untyped-def]
        if trainer.step == 2:
            raise RuntimeError("injected failure")
        return original()

    trainer.train_step = failing_step  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        trainer.fit()
    crash = json.loads((root / "crash" / "status.json").read_text())
    assert crash["status"] == "failed" and "injected failure" in crash["error"] and crash["step"] == 2

    proc = cli("runs", str(root))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert proc.stdout.splitlines()[0].split() == ["RUN", "NAME", "STATUS", "STEP", "TOKENS", "LOSS", "VAL_BPB",
                                                   "CHECKPOINT", "WALL"]
    assert rows["a"][1:4] == ["alpha", "finished", "6/6"] and rows["a"][7] == "step_000006"
    assert rows["pre"][2] == "preempted" and rows["pre"][3] == "4/6"
    assert rows["nested/killed"][2] == "failed"
    assert rows["crash"][2:4] == ["failed", "2/6"]
    assert float(rows["a"][5]) > 0 and float(rows["a"][6]) > 0 and rows["a"][4] == "6.1k"
    as_json = json.loads(cli("runs", str(root), "--json").stdout)
    assert {r["status"] for r in as_json} == {"finished", "preempted", "failed"}
