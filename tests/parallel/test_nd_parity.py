"""N-D parallelism parity on gloo: tensor (+sequence) and context parallelism, alone and composed with
FSDP2, match the single-process run step by step (fp32, 8 steps: losses and grad norms within 1e-5
relative); evaluation and greedy generation match too; a run resumes across layouts.

Every layout starts from the same weights (the sharding-independent init draws each rank's block of
every tensor), reads the same global batch (tensor/context-parallel peers share a data rank) and
averages gradients the same way. The model has grouped-query attention (4 heads, 2 kv heads), so
tensor parallelism splits the kv heads and context parallelism on top repeats them before the
all-to-all. One launch per world size trains every layout of that size in turn (in-process ranks,
tests/helpers.py ``run_distributed``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import build_trainer, overriding, run_distributed, train_records

STEPS = 8
COMMON = ["model.num_layers=2", "model.dim=64", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=128",
          f"train.max_steps={STEPS}", "train.global_batch_tokens=1024", "train.micro_batch_size=2",
          "train.lr_warmup_steps=2", "train.precision=fp32", "log.every_steps=1", "eval.every_steps=0",
          "eval.at_end=true", "eval.max_batches=2", "eval.final_max_batches=2",
          "checkpoint.at_end=false", "log.sample_at_end=false",
          "run.device=cpu", "run.num_threads=1"]
REL = 1e-5
TIMEOUT = 600
FSDP = "parallel.strategy=fsdp"
SAMPLE_TOKENS = 12

# The single-process references: the model/data variations some layouts use.
REFERENCES: dict[str, list[str]] = {
    "plain": [],
    "docs": ["data.document_ids=true"],  # document masking: attention stays inside each packed document
    "untied-zloss": ["model.tie_embeddings=false", "model.z_loss=1e-3"],
    # Pipeline stages cannot share a tied embedding; 4 blocks make 4 stages for the interleaved schedule.
    "untied-4-layers": ["model.tie_embeddings=false", "model.num_layers=4"],
}
# name -> (ranks, parallel overrides, reference)
LAYOUTS: dict[str, tuple[int, list[str], str]] = {
    "tp2": (2, [FSDP, "parallel.tensor_parallel=2"], "plain"),
    "cp2": (2, [FSDP, "parallel.context_parallel=2"], "plain"),
    "cp2-docs": (2, [FSDP, "parallel.context_parallel=2"], "docs"),
    "fsdp2xtp2-untied-zloss": (4, [FSDP, "parallel.tensor_parallel=2"], "untied-zloss"),
    "tp2xcp2": (4, [FSDP, "parallel.tensor_parallel=2", "parallel.context_parallel=2"], "plain"),
    "pp2-1f1b": (2, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=1f1b"], "untied-4-layers"),
    "pp2-interleaved-1f1b": (2, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved_1f1b",
                                 "parallel.pipeline_virtual_stages=2"], "untied-4-layers"),
    "pp2xfsdp2-gpipe": (4, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=gpipe"],
                        "untied-4-layers"),
}


def train_eval_generate(out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train, then evaluate and generate greedily on every rank; rank 0's records, eval and text (others: None)."""
    import torch

    from bigtrain import messages
    from bigtrain.model.sampling import generate

    threads = torch.get_num_threads()
    trainer = None
    try:
        with messages.capture() as lines:
            trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out_dir}", *overrides, "log.console=false"])
            trainer.fit()
            text = generate(trainer.strategy.unwrap(trainer.model), trainer.tokenizer, "The", temperature=0.0,
                            max_new_tokens=SAMPLE_TOKENS, device=trainer.info.device)
        is_main = trainer.info.is_main
    finally:
        if trainer is not None:
            trainer.loader.close()
        torch.set_num_threads(threads)
    if not is_main:
        return {}
    evals = [r for r in _records(out_dir) if r.get("kind") == "eval"]
    return {"records": train_records(out_dir), "eval": evals[-1]["val_loss"], "text": text, "messages": lines}


def _records(out_dir: Path) -> list[dict]:
    from tests.helpers import read_metrics

    return read_metrics(out_dir)


def train_layouts(rank: int, root: str, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        _, overrides, ref = LAYOUTS[name]
        out[name] = train_eval_generate(Path(root) / name, overriding(COMMON, *REFERENCES[ref], *overrides))
    return out


@pytest.fixture(scope="module")
def nd_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, dict]:
    import torch.distributed as dist

    root = tmp_path_factory.mktemp("nd")
    results = {f"single-{ref}": train_eval_generate(root / f"single-{ref}", overriding(COMMON, *extra))
               for ref, extra in REFERENCES.items()}
    assert not dist.is_initialized()
    for world in (2, 4):
        names = [n for n, (ranks, _, _) in LAYOUTS.items() if ranks == world]
        results.update(run_distributed(train_layouts, world, str(root), names, timeout_s=TIMEOUT)[0])
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single(nd_runs: dict[str, dict], name: str) -> None:
    ranks, _, ref = LAYOUTS[name]
    got, want = nd_runs[name], nd_runs[f"single-{ref}"]
    assert [r["step"] for r in got["records"]] == [r["step"] for r in want["records"]] == list(range(1, STEPS + 1))
    assert want["records"][-1]["loss"] < want["records"][0]["loss"]  # it learns
    for g, w in zip(got["records"], want["records"], strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), f"{name}: step {g['step']} {key} {g[key]!r} vs {w[key]!r}"
    assert got["eval"] == pytest.approx(want["eval"], rel=REL), name
    assert got["text"] == want["text"], name
    assert any(f"cpu x {ranks}, strategy fsdp (" in m for m in got["messages"]), got["messages"]


# ---------------------------------------------------------------------------------------------- across layouts
HALF = 10
RESUME = ["checkpoint.every_steps=10", "checkpoint.keep_last=5", f"train.max_steps={2 * HALF}",
          "eval.at_end=false"]


def train_on_layout(rank: int, out_dir: str, overrides: list[str]) -> None:
    from tests.helpers import train

    train(Path(out_dir), *overrides)


# name -> (first layout's overrides, second layout's overrides, reference)
ACROSS = {
    "tp2-then-fsdp2": ([FSDP, "parallel.tensor_parallel=2"], [FSDP], "plain"),
    "pp2-then-single": ([FSDP, "parallel.pipeline_parallel=2"], ["parallel.strategy=single"], "untied-4-layers"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACROSS))
def test_resume_on_another_layout_matches_straight_run(tmp_path: Path, demo_data: Path, name: str) -> None:
    """20 straight steps on one process; the same run on the first layout, stopped at its step-10 checkpoint and
    resumed on the second layout, continues within 1e-5."""
    from tests.helpers import train

    first, second, ref = ACROSS[name]
    base = overriding(COMMON, *REFERENCES[ref], *RESUME)
    train(tmp_path / "straight", *base)
    run_distributed(train_on_layout, 2, str(tmp_path / "first"), [*base, *first], timeout_s=TIMEOUT)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "first", resumed)
    (resumed / "checkpoints" / "latest").write_text(f"step_{HALF:06d}\n")
    (resumed / "metrics.jsonl").write_text("")
    overrides = [*base, *second, "checkpoint.resume=auto"]
    if second == ["parallel.strategy=single"]:
        train(resumed, *overrides)
    else:
        run_distributed(train_on_layout, 2, str(resumed), overrides, timeout_s=TIMEOUT)
    want = {r["step"]: r for r in train_records(tmp_path / "straight")}
    got = train_records(resumed)
    assert [r["step"] for r in got] == list(range(HALF + 1, 2 * HALF + 1))
    for g in got:
        w = want[g["step"]]
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), f"step {g['step']} {key} {g[key]!r} vs {w[key]!r}"
