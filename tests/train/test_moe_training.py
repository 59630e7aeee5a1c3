"""MoE through the trainer: per-layer routing metrics on log steps, the console line, no host sync on
non-log steps, and exact resume of the routing biases (the expert-parallel layouts: tests/parallel/test_ep.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bigtrain import messages
from bigtrain.model.moe import grouped_mm_available, moe_layers
from tests.helpers import build_trainer, read_metrics, record_host_syncs, train, train_records

TINY = ("data.seq_len=64", "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.max_steps=6",
        "train.lr_warmup_steps=2", "eval.every_steps=0", "eval.final_max_batches=2", "log.sample_tokens=0",
        "model.dim=64", "model.moe.expert_hidden_dim=64", "model.moe.num_experts=4",
        "checkpoint.every_steps=0", "checkpoint.at_end=false")
CONFIG = "configs/moe-debug.yaml"


def test_routing_metrics_on_log_steps_and_in_the_console(tmp_path: Path, demo_data: Path) -> None:
    # An evaluation after every step on the same 2 batches as the final one (cheap at this size): the first,
    # after one update, is the baseline the model must improve on.
    summary, lines = train(tmp_path / "run", *TINY, "log.every_steps=3", "model.moe.router_z_loss=0.001",
                           "eval.every_steps=1", "eval.max_batches=2", config=CONFIG)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 3, 6]
    for record in records:
        for layer in range(4):
            assert record[f"moe_imbalance/layers.{layer}"] >= 1.0
            assert record[f"moe_aux_loss/layers.{layer}"] > 0
            assert record[f"moe_z_loss/layers.{layer}"] > 0
            assert 0 < record[f"moe_entropy/layers.{layer}"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        assert record["moe_imbalance_max"] == max(record[f"moe_imbalance/layers.{i}"] for i in range(4))
    header = next(line for line in lines if line.startswith("bigtrain: run"))
    assert "  moe      4 experts, top 2," in header and "active params/token" in header
    # Evaluation runs the MoE model without routing losses, and it learns: 6 steps take val bpb from about
    # 4.05 after the first step to 3.53 (loss 8.22 -> 7.16); a model that does not learn stays near 1.0x.
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6], evals
    first = evals[0]
    assert summary["val_bpb"] == evals[-1]["val_bpb"]  # the final evaluation is the one at step 6
    assert summary["val_bpb"] < 0.95 * first["val_bpb"], (first, summary)
    assert summary["val_loss"] < 0.95 * first["val_loss"], (first, summary)


def test_no_host_sync_on_non_log_steps(tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped expert matmuls take their offsets on the device; routing statistics are read on log steps."""
    if not grouped_mm_available():
        pytest.skip("torch._grouped_mm is missing from this torch: the expert loop reads counts on the host")
    with messages.capture():
        trainer = build_trainer(CONFIG, [f"run.out_dir={tmp_path / 'run'}", *TINY, "log.every_steps=4",
                                         "train.max_steps=5", "log.console=false", "eval.at_end=false",
                                         "log.sample_at_end=false", "model.moe.load_balance=bias"])
    syncs = record_host_syncs(trainer, monkeypatch)
    try:
        with messages.capture():
            trainer.fit()
    finally:
        monkeypatch.undo()
        trainer.loader.close()
    assert set(syncs) - {0} <= {1, 4, 5}, f"host syncs on non-log steps: {dict(syncs)}"
    assert all(syncs.get(s, 0) > 0 for s in (1, 4, 5)), dict(syncs)


def test_resume_continues_routing_biases_bitwise(tmp_path: Path, demo_data: Path) -> None:
    """Bias balancing: the biases are model state, so a resumed run routes exactly as the straight run."""
    run = (*TINY, "model.moe.load_balance=bias", "model.moe.bias_update_rate=0.01", "log.every_steps=1",
           "checkpoint.every_steps=3", "checkpoint.keep_last=2")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    with messages.capture():
        straight = build_trainer(CONFIG, [f"run.out_dir={straight_dir}", *run, "log.console=false"])
        straight.fit()
    straight.loader.close()
    biases = [m.router.expert_bias.clone() for _, m in moe_layers(straight.model)]
    assert all(b.abs().sum() > 0 for b in biases)  # they moved

    shutil.copytree(straight_dir, resumed_dir)
    (resumed_dir / "metrics.jsonl").write_text("")
    _, _ = train(resumed_dir, *run, f"checkpoint.resume={resumed_dir / 'checkpoints' / 'step_000003'}",
                 config=CONFIG)
    again = {r["step"]: r for r in train_records(resumed_dir)}
    first = {r["step"]: r for r in train_records(straight_dir)}
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step]["loss"] == first[step]["loss"]
        assert again[step]["moe_imbalance_max"] == first[step]["moe_imbalance_max"]


def test_bf16_training_tracks_fp32(tmp_path: Path, demo_data: Path) -> None:
    """A MoE model trains in bf16 (autocast; the grouped matmul in bf16) within 2% of the fp32 losses."""
    losses = {}
    for precision in ("fp32", "bf16"):
        train(tmp_path / precision, *TINY, "train.max_steps=3", "log.every_steps=1", "eval.final_max_batches=1",
              f"train.precision={precision}", config=CONFIG)
        losses[precision] = [r["loss"] for r in train_records(tmp_path / precision)]
    assert len(losses["bf16"]) == 3 and all(map(torch.isfinite, torch.tensor(losses["bf16"])))
    for got, want in zip(losses["bf16"], losses["fp32"], strict=True):
        assert got == pytest.approx(want, rel=0.02), losses
