"""`bigtrain train` under torchrun on 2 CPU ranks, once per backend (ddp, fsdp, zero), end to end; and a bad
distributed input exiting 2 from every worker without a traceback.

Numerics (parity with one process, resume, resharding) are checked with in-process ranks in
tests/parallel and tests/checkpoint; these runs check the launch: the processes, the exit status,
what is printed and written. The DDP run also checks the step-time breakdown on two ranks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_torchrun

TINY = ["train.optimizer=adamw", "model.num_layers=1", "model.dim=64", "train.max_steps=6",
        "train.global_batch_tokens=2048", "train.micro_batch_size=4", "train.lr_warmup_steps=2", "log.every_steps=2",
        "eval.every_steps=0", "eval.at_end=true", "eval.final_max_batches=1", "log.sample_at_end=false",
        "run.num_threads=1", "checkpoint.every_steps=2", "train.precision=fp32", "run.device=cpu"]
BACKENDS = {  # strategy -> (overrides, checkpoint backend)
    "ddp": (["parallel.strategy=ddp"], "dcp"),
    "fsdp": (["parallel.strategy=fsdp"], "dcp"),
    "zero": (["parallel.strategy=zero", "parallel.zero.stage=2"], "deepspeed"),
}


@pytest.mark.parametrize("strategy", list(BACKENDS))
def test_train_under_torchrun(strategy: str, tmp_path: Path, demo_data: Path) -> None:
    if strategy == "zero":
        pytest.importorskip("deepspeed")
    overrides, checkpoint_backend = BACKENDS[strategy]
    out = tmp_path / strategy
    proc = run_torchrun("train", "configs/debug.yaml", f"run.out_dir={out}", *TINY, *overrides, timeout=600,
                        env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"device   cpu x 2, strategy {strategy}" in proc.stdout, proc.stdout
    assert "done: 6 steps, 12,288 tokens" in proc.stdout and "val_bpb" in proc.stdout, proc.stdout
    assert proc.stdout.count("done: ") == 1  # rank 0 reports
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]  # rank 0 only writes metrics
    assert train[-1]["loss"] < train[0]["loss"]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000006"
    manifest = json.loads((out / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == checkpoint_backend, manifest
    if strategy == "ddp":  # the step-time breakdown on two ranks has the collectives
        for r in train:
            assert r["collectives_s"] > 0  # the loss all-reduce and the stop-signal agreement, on gloo
            total = sum(r.get(k, 0.0) for k in ("data_wait_s", "fwd_bwd_s", "optimizer_s", "checkpoint_stall_s",
                                                "collectives_s"))
            assert abs(total - r["step_time_s"]) <= 0.10 * r["step_time_s"], (r["step"], total, r["step_time_s"])


def test_bad_distributed_input_exits_2_on_every_worker(tmp_path: Path, demo_data: Path) -> None:
    """torchrun itself exits 1 when a worker fails; the workers exit 2 with the message, no traceback of ours.
    (Other distributed-only user errors are checked in process: tests/parallel/test_parity.py.)"""
    proc = run_torchrun("train", "configs/debug.yaml", f"run.out_dir={tmp_path}/run", *TINY,
                        "parallel.strategy=fsdp", "parallel.fsdp.replicate_degree=3", nproc=2, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "(exitcode: 2)" in out, out
    assert not re.search(r'File ".*/bigtrain/', out), out  # torchrun's own ChildFailedError traceback is fine
    for needle in ("replicate_degree=3", "needs a multiple of 3 processes"):
        assert needle in out, out
    # bigtrain says it once (rank 0), names what torchrun's report is, and torchrun's report carries the message
    # instead of a pointer to its docs (the workers' error files).
    assert out.count("bigtrain: error:") == 1 + 2, out  # once from rank 0, plus once per rank in torchrun's report
    assert "failed: UserError" not in out and "torchrun's ChildFailedError report below is about this error" in out
    assert "To enable traceback see" not in out, out
