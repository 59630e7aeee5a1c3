"""N-D parallelism parity on gloo: tensor (+sequence) and context parallelism, alone and composed with
FSDP2, match the single-process run step by step (fp64, 4 steps: losses and grad norms within the tolerance
policy's FP64_REL, tests/tolerance.py); evaluation and greedy generation match too (tp2, cp2, pp2); a run
resumes across layouts.
Two 4-rank layouts (tp2 x cp2, pp2 x tp2) compile their blocks (train.compile).

Every layout starts from the same weights (the sharding-independent init draws each rank's block of
every tensor), reads the same global batch (tensor/context-parallel peers share a data rank) and
averages gradients the same way. The model has grouped-query attention (4 heads, 2 kv heads), so
tensor parallelism splits the kv heads and context parallelism on top repeats them before the
all-to-all. One launch per world size trains every layout of that size in turn (in-process ranks,
tests/helpers.py ``run_distributed``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import build_trainer, overriding, run_distributed, train_records
from tests.parallel.measure_memory import held_after_backward
from tests.tolerance import FP32_REL, FP64, FP64_REL, assert_runs_close, assert_weights_close

STEPS = 4
# No QK-norm: with it, this model at this learning rate passes through an ill-conditioned step 6, where
# rounding-order changes are amplified ~100x (one process, accumulation 2 vs 1: grad norm 1.3e-5 apart
# with QK-norm, 0 without), so tp2's rounding (3e-7 per gradient at equal weights) shows 6e-4 there and
# recovers by step 8; not a reduction error: QK-norm gradients under tensor parallelism are checked at
# equal weights in test_qk_norm_tp.py, and the MoE layouts of test_ep.py train with QK-norm.
COMMON = ["train.optimizer=adamw", "model.qk_norm=false", "model.num_layers=2", "model.dim=64", "model.num_heads=4",
          "model.num_kv_heads=2",
          "data.seq_len=64",
          f"train.max_steps={STEPS}", "train.global_batch_tokens=512", "train.micro_batch_size=4",
          "train.lr_warmup_steps=2", FP64, "log.every_steps=1", "eval.every_steps=0",
          "eval.at_end=true", "eval.max_batches=2", "eval.final_max_batches=2",
          "checkpoint.at_end=false", "log.sample_at_end=false",
          "run.device=cpu", "run.num_threads=1",
          # Tied unless a reference unties it (the demo config's output is untied): an untied embedding's
          # gradient is sparse, and Adam amplifies rounding on its near-zero rows (fsdp2xtp2 -> fsdp2 resume:
          # the embedding just over REL apart norm-wise), so the untied references are the ones listed below.
          "model.tie_embeddings=true"]
TIMEOUT = 600
FSDP = "parallel.strategy=fsdp"
SAMPLE_TOKENS = 12

COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
DOCS = ["data.document_ids=true", "data.train_path=data/short-docs/train", "data.val_path=data/short-docs/val",
        "data.tokenizer=data/short-docs/tokenizer.json"]
# The single-process references: the model/data variations some layouts use.
REFERENCES: dict[str, list[str]] = {
    "plain": [],
    # Document masking (attention stays inside each packed document) on a corpus of short documents, so that
    # sequences cross document boundaries (conftest.py short_documents).
    "docs": DOCS,
    "untied-zloss": ["model.tie_embeddings=false", "model.z_loss=1e-3"],
    # Pipeline stages cannot share a tied embedding; 4 blocks make 4 stages for the interleaved schedule.
    "untied-4-layers": ["model.tie_embeddings=false", "model.num_layers=4"],
    "untied-4-layers-docs": ["model.tie_embeddings=false", "model.num_layers=4", *DOCS],
}
# name -> (ranks, parallel overrides, reference)
LAYOUTS: dict[str, tuple[int, list[str], str]] = {
    "tp2": (2, [FSDP, "parallel.tensor_parallel=2"], "plain"),
    "cp2": (2, [FSDP, "parallel.context_parallel=2"], "plain"),
    "cp2-docs": (2, [FSDP, "parallel.context_parallel=2"], "docs"),
    "fsdp2xtp2-untied-zloss": (4, [FSDP, "parallel.tensor_parallel=2"], "untied-zloss"),
    # Compiled blocks (aot_eager: dynamo and AOTAutograd capture the DTensor and all-to-all code, without
    # inductor's minute of CPU code generation; the ops are eager's, so the numbers must match exactly).
    "tp2xcp2-compiled": (4, [FSDP, "parallel.tensor_parallel=2", "parallel.context_parallel=2", *COMPILED], "plain"),
    "pp2-1f1b": (2, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=1f1b"], "untied-4-layers"),
    "pp2-interleaved-1f1b": (2, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved_1f1b",
                                 "parallel.pipeline_virtual_stages=2"], "untied-4-layers"),
    # Document ids and positions travel between stages with the activations.
    "pp2-docs": (2, [FSDP, "parallel.pipeline_parallel=2"], "untied-4-layers-docs"),
    # Zero-bubble: each backward split into input- and weight-gradient passes (gathered parameters kept).
    "pp2-interleaved-zb": (2, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved_zb",
                               "parallel.pipeline_virtual_stages=2"], "untied-4-layers"),
    # 2 data-parallel ranks x 4 sequences: the pipeline splits each rank's 4 sequences into 2 microbatches.
    "pp2xfsdp2-gpipe": (4, [FSDP, "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=gpipe",
                            "parallel.pipeline_microbatches=2"], "untied-4-layers"),
    "pp2xtp2-compiled": (4, [FSDP, "parallel.pipeline_parallel=2", "parallel.tensor_parallel=2", *COMPILED],
                         "untied-4-layers"),
    # Each context-parallel rank's slice of the sequence, with its rotary positions, through the stages.
    "pp2xcp2": (4, [FSDP, "parallel.pipeline_parallel=2", "parallel.context_parallel=2"], "untied-4-layers"),
}


# The layouts whose evaluation and greedy generation are compared too (each inference path once: tensor,
# context and pipeline parallel); the others train only (inference costs time and proves nothing new there).
INFERENCE = {"tp2", "cp2", "pp2-1f1b", "pp2-docs"}


def train_eval_generate(out_dir: Path, overrides: list[str], infer: bool = True) -> dict[str, Any]:
    """Train, then (``infer``) evaluate and generate greedily on every rank; rank 0's records, eval and text."""
    import torch

    from bigtrain import messages
    from bigtrain.model.sampling import generate

    threads = torch.get_num_threads()
    trainer = None
    try:
        with messages.capture() as lines:
            trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out_dir}", *overrides, "log.console=false",
                                                           *([] if infer else ["eval.at_end=false"])])
            trainer.fit()
            held = held_after_backward(trainer)  # for the plan-vs-measured check below
            text = generate(trainer.strategy.unwrap(trainer.model), trainer.tokenizer, "The", temperature=0.0,
                            max_new_tokens=SAMPLE_TOKENS, device=trainer.info.device) if infer else None
        is_main = trainer.info.is_main
    finally:
        if trainer is not None:
            trainer.loader.close()
        torch.set_num_threads(threads)
    if not is_main:
        return {"held": held}
    evals = [r for r in _records(out_dir) if r.get("kind") == "eval"]
    return {"records": train_records(out_dir), "eval": evals[-1]["val_loss"] if infer else None, "text": text,
            "messages": lines, "held": held}


def _records(out_dir: Path) -> list[dict]:
    from tests.helpers import read_metrics

    return read_metrics(out_dir)


def train_layouts(rank: int, root: str, names: list[str], halves: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Every layout of ``names``, then each (run folder, overrides) of ``halves`` (the halves of the
    across-layout runs this world size trains: they share the launch)."""
    from tests.helpers import train

    out = {}
    for name in names:
        _, overrides, ref = LAYOUTS[name]
        out[name] = train_eval_generate(Path(root) / name, overriding(COMMON, *REFERENCES[ref], *overrides),
                                        infer=name in INFERENCE)
    for run_dir, overrides in halves:
        train(Path(run_dir), *overrides)
    return out


@pytest.fixture(scope="module")
def nd_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path, short_documents: Path) -> dict[str, dict]:
    import torch.distributed as dist

    root = tmp_path_factory.mktemp("nd")
    inferred = {LAYOUTS[name][2] for name in INFERENCE}  # the references those layouts compare with
    results = {f"single-{ref}": train_eval_generate(root / f"single-{ref}", overriding(COMMON, *extra),
                                                    infer=ref in inferred)
               for ref, extra in REFERENCES.items()}
    assert not dist.is_initialized()
    # The across-layout runs (test_resume_on_another_layout_matches_straight_run) train their halves in the
    # same launches: the larger world sizes first, so each first half is done before its second half starts.
    assert all(spec[0] > spec[2] for spec in ACROSS.values())
    first = {name: (spec[0], root / "across" / name, [*_across_base(name), *spec[1], f"train.max_steps={HALF}"])
             for name, spec in ACROSS.items()}
    second = {name: (spec[2], root / "across" / name, [*_across_base(name), *spec[3],
                                                       f"train.max_steps={2 * HALF}", "checkpoint.resume=auto"])
              for name, spec in ACROSS.items()}
    for world in (4, 2, 1):
        names = [n for n, (ranks, _, _) in LAYOUTS.items() if ranks == world]
        halves = [(str(run_dir), overrides) for ranks, run_dir, overrides in [*second.values(), *first.values()]
                  if ranks == world]
        if world == 1:
            train_layouts(0, str(root), names, halves)
        else:
            per_rank = run_distributed(train_layouts, world, str(root), names, halves, timeout_s=TIMEOUT)
            for name in names:
                results[name] = {**per_rank[0][name], "held_per_rank": [r[name]["held"] for r in per_rank]}
        for ranks, run_dir, _ in first.values():
            if ranks == world:  # the second half's records only, from here on
                (run_dir / "metrics.jsonl").write_text("")
    results["across"] = {name: run_dir for name, (_, run_dir, _) in first.items()}
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single(nd_runs: dict[str, dict], name: str) -> None:
    ranks, _, ref = LAYOUTS[name]
    got, want = nd_runs[name], nd_runs[f"single-{ref}"]
    assert [r["step"] for r in got["records"]] == [r["step"] for r in want["records"]] == list(range(1, STEPS + 1))
    assert want["records"][-1]["loss"] < want["records"][0]["loss"]  # it learns
    assert_runs_close(got["records"], want["records"], FP64_REL, name)
    if name in INFERENCE:
        assert got["eval"] == pytest.approx(want["eval"], rel=FP64_REL), name
        assert got["text"] == want["text"], name
    assert any(f"cpu x {ranks}, strategy fsdp (" in m for m in got["messages"]), got["messages"]
    assert any("blocks torch.compile'd (aot_eager)" in m for m in got["messages"]) == name.endswith("-compiled")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_matches_what_each_layout_holds(nd_runs: dict[str, dict], name: str) -> None:
    """`bigtrain plan`'s params + grads + optimizer bytes for the layout are within 10% of the most any rank
    holds after backward (bigtrain.parallel.memory.held_state_bytes)."""
    from bigtrain.config import load_config
    from bigtrain.parallel.mesh import Layout
    from bigtrain.plan_layout import Hardware, plan_layout

    ranks, overrides, ref = LAYOUTS[name]
    cfg = load_config("configs/debug.yaml", overriding(COMMON, *REFERENCES[ref], *overrides))
    plan = plan_layout(cfg, Layout.from_config(cfg.parallel, ranks), Hardware(), device="cpu")
    measured = max(held["total"] for held in nd_runs[name]["held_per_rank"])
    assert abs(plan.state - measured) <= 0.10 * measured, f"{name}: planned {plan.state:,} B, measured {measured:,} B"


# ---------------------------------------------------------------------------------------------- across layouts
HALF = 4
# A constant learning rate after warm-up: a run of HALF steps ends where the first half of a 2 x HALF run does.
RESUME = ["train.lr_schedule=constant", "checkpoint.keep_last=5", "eval.at_end=false", "checkpoint.at_end=true"]
# name -> (ranks, overrides of the first half; ranks, overrides of the second half; reference)
ACROSS = {
    # (TP2 -> data parallel is the 4-rank case: tensor parallelism removed, the FSDP degree changed too.)
    "fsdp2xtp2-to-fsdp2": (4, [FSDP, "parallel.tensor_parallel=2"], 2, [FSDP], "plain"),
    "cp2-to-single": (2, [FSDP, "parallel.context_parallel=2"], 1, ["parallel.strategy=single"], "plain"),
    "pp2-to-single": (2, [FSDP, "parallel.pipeline_parallel=2"], 1, ["parallel.strategy=single"], "untied-4-layers"),
}


def _across_base(name: str) -> list[str]:
    return overriding(COMMON, *REFERENCES[ACROSS[name][-1]], *RESUME)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, Path]:
    """2 x HALF steps on one process, per reference model."""
    from tests.helpers import train

    root = tmp_path_factory.mktemp("straight")
    runs = {}
    for ref in sorted({spec[-1] for spec in ACROSS.values()}):
        runs[ref] = root / ref
        train(runs[ref], *overriding(COMMON, *REFERENCES[ref], *RESUME, f"train.max_steps={2 * HALF}",
                                     f"checkpoint.every_steps={HALF}"))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACROSS))
def test_resume_on_another_layout_matches_straight_run(tmp_path: Path, nd_runs: dict[str, Any],
                                                       straight_runs: dict[str, Path], name: str) -> None:
    """HALF steps on the first layout, resumed from its checkpoint on the second layout for HALF more (both
    trained by the nd_runs launches): every step within FP64_REL of the straight run; the first layout's
    checkpoint holds the same fp64 weights and exports the same Hugging Face (fp32) weights."""
    from safetensors.torch import load_file

    from bigtrain.checkpoint.manager import load_model_weights
    from bigtrain.export import export_checkpoint

    ref = ACROSS[name][-1]
    run = nd_runs["across"][name]

    step = f"step_{HALF:06d}"
    saved = [load_model_weights(ckpt / "checkpoints" / step, as_fp32=False)[0] for ckpt in (straight_runs[ref], run)]
    assert_weights_close(saved[1], saved[0], FP64_REL, name)
    for what, ckpt in (("straight", straight_runs[ref]), ("first", run)):
        export_checkpoint(ckpt / "checkpoints" / step, "hf", tmp_path / f"hf-{what}")
    exported = [load_file(tmp_path / f"hf-{what}" / "model.safetensors") for what in ("straight", "first")]
    # The export rounds to fp32: weights 1e-10 apart may round to neighbouring fp32 values.
    assert_weights_close(exported[1], exported[0], FP32_REL, f"{name} (exported)")
    want = train_records(straight_runs[ref])[HALF:]
    got = train_records(run)
    assert [r["step"] for r in got] == list(range(HALF + 1, 2 * HALF + 1))
    assert_runs_close(got, want, FP64_REL, name)
