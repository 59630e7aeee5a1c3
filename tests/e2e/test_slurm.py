"""The real launch/slurm.sbatch on a real (local) Slurm: two slurmd "nodes" on this host.

The session fixture installs Debian's slurmctld, slurmd and slurm-client with apt when the tests
run as root with apt-get available (skipped with the reason otherwise), writes a two-node
slurm.conf (auth/none, cred/none, proctrack/linuxproc, task/none, both nodes at 127.0.0.1 on
their own ports) into a temporary folder, runs the daemons in the foreground and stops them by
PID at the end. Jobs run the debug config with a tiny model on 2 nodes x 1 CPU process (gloo).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, free_ports, run_distributed

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=2", "train.precision=fp32",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu", "log.every_steps=1",
        "log.console=false", "parallel.strategy=ddp", "parallel.timeout_s=60", "checkpoint.every_steps=0",
        "train.max_steps=40"]
JOB_TIMEOUT = 240



def _ensure_slurm_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be: the real-Slurm tests install Debian's "
                    f"{' '.join(PACKAGES)} with apt-get, which needs root and apt "
                    "(run the tests as root on Debian/Ubuntu)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"could not install Slurm with `{' '.join(cmd)}` (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout)[-500:]}")


class LocalSlurm:
    """A running two-node cluster; every client call gets SLURM_CONF."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.daemons: list[subprocess.Popen] = []

    def write_config(self) -> None:
        ctld, slurmd, n1, n2 = free_ports(4)
        host = socket.gethostname()
        r = self.root
        for sub in ("state", "spool-n1", "spool-n2"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "slurm.conf").write_text(f"""\
ClusterName=bigtraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={n1} CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={n2} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        # The daemons write to their own copies of the file descriptor: ours can be closed once they started.
        with open(self.root / "daemons.out", "ab") as log:
            # -D: foreground, so we hold the PIDs; -i: ignore any saved state.
            self.daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=self.env, stdout=log, stderr=log))
            time.sleep(1)
            for node in ("n1", "n2"):
                self.daemons.append(subprocess.Popen(["slurmd", "-D", "-N", node], env=self.env, stdout=log,
                                                     stderr=log))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.nodes_idle():
                return
            if any(d.poll() is not None for d in self.daemons):
                break
            time.sleep(0.5)
        raise RuntimeError("the local Slurm cluster did not come up: " + self.logs())

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for d in reversed(self.daemons):  # by PID, never by name
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)
        for d in self.daemons:
            try:
                d.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()

    def logs(self) -> str:
        parts = []
        for name in ("daemons.out", "slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def submit(self, out_dir: Path, *overrides: str) -> tuple[str, Path]:
        log = out_dir.parent / f"{out_dir.name}.slurm.out"
        env = {**self.env, "BIGTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={log}", f"--chdir={REPO}",
                               str(REPO / "launch" / "slurm.sbatch"), "configs/debug.yaml", f"run.out_dir={out_dir}",
                               *TINY, *overrides], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0], log

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def nodes_idle(self) -> bool:
        return self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.split()[:2] == ["idle", "2"]

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nodes_idle():
                return
            time.sleep(0.5)
        raise AssertionError(f"the nodes did not become idle within {timeout}s: " + self.logs())

    def wait_state(self, job_id: str, states: set[str], timeout: float = JOB_TIMEOUT, log: Path | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        text = log.read_text(errors="replace") if log and log.is_file() else ""
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}\n{text}\n"
                             f"{self.logs()}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    _ensure_slurm_installed()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.write_config()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def final_train_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"][-1]


def train_reference(rank: int, out_dir: str) -> None:
    """The same 2-rank DDP run, uninterrupted, launched in-process (tests/helpers.py ``run_distributed``)."""
    from tests.helpers import train

    train(Path(out_dir), *[o for o in TINY if not o.startswith("log.console=")])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The straight run the preempted job must end like (a third sbatch job would only add Slurm's start-up)."""
    out = tmp_path_factory.mktemp("reference") / "plain"
    run_distributed(train_reference, 2, str(out), timeout_s=JOB_TIMEOUT)
    return out


@pytest.mark.slow
def test_usr1_checkpoints_requeues_resumes_and_matches(slurm: LocalSlurm, uninterrupted: Path,
                                                       tmp_path: Path) -> None:
    """sbatch on 2 nodes; SIGUSR1 (what Slurm sends before the time limit) checkpoints and requeues the job, the
    next attempt resumes from that checkpoint, finishes, checkpoints at the end and ends where the straight run
    does."""
    out = tmp_path / "preempted"
    job_id, log = slurm.submit(out)
    slurm.wait_state(job_id, {"RUNNING"}, log=log)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count('"train"') >= 3):
        assert time.monotonic() < deadline and slurm.job(job_id)["JobState"] == "RUNNING", log.read_text()
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job_id)  # what Slurm does before the time limit (to the job steps)

    # The job checkpoints and requeues itself; skip Slurm's requeue delay (BeginTime) to keep the test short.
    info = slurm.wait_state(job_id, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, log=log)
    assert info["JobState"] in ("PENDING", "REQUEUED"), log.read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGUSR1", status
    stopped = status["step"]
    assert 3 <= stopped < 40
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}"
    slurm.wait_state(job_id, {"PENDING"}, log=log)
    # Slurm's requeue delay also protects the restart from the revoked credential of the attempt
    # before: slurmd rejects a credential issued in the same second as the revocation ("Job
    # credential revoked", job FAILED). So let the nodes drain and the clock move on first.
    slurm.wait_nodes_idle()
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "2 nodes x 1 ranks, rendezvous 127.0.0.1:" in text, text
    assert "requeueing job" in text and "attempt 1" in text and f"step_{stopped:06d}" in text, text
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000040"
    assert (out / "checkpoints" / "step_000040" / "manifest.json").is_file()
    want, got = final_train_record(uninterrupted), final_train_record(out)
    assert got["step"] == want["step"] == 40
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0), (got, want)
