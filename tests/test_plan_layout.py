"""`bigtrain plan` for N-D layouts (bigtrain/plan_layout.py): memory splits as the code splits the model,
the step-time estimate moves the way its model says, and the 405B config gets a layout that fits 80 GB.
(Plan vs what tiny models really hold in each layout: tests/parallel/test_nd_parity.py.)"""
from __future__ import annotations

import pytest

from bigtrain.config import load_config
from bigtrain.model import count_parameters
from bigtrain.parallel.mesh import Layout
from bigtrain.plan import GIB
from bigtrain.plan_layout import Hardware, candidate_layouts, format_layouts, plan_layout, rank_layouts
from tests.helpers import cli

HW = Hardware()


def test_state_divides_by_every_model_dimension() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.strategy=fsdp"])
    one = plan_layout(cfg, Layout(dp_shard=8), HW)
    assert one.state == pytest.approx(16 * count_parameters(cfg.model) / 8, rel=0.01)  # fp32 p + g + 2 moments
    tp = plan_layout(cfg, Layout(dp_shard=4, tp=2), HW)
    cp = plan_layout(cfg, Layout(dp_shard=4, cp=2), HW)
    # Tensor parallelism shards what FSDP shards (norms aside): the same state on 8 ranks either way.
    assert tp.state == pytest.approx(one.state, rel=0.01) and cp.state == pytest.approx(one.state, rel=0.01)
    # ... but it splits activations: TP (sequence-parallel parts), CP (the sequence) roughly halve them.
    assert tp.activations < 0.7 * one.activations and cp.activations == pytest.approx(one.activations / 2, rel=0.01)
    assert tp.tp_s > 0 and cp.cp_s > 0 and one.tp_s == one.cp_s == 0


def test_pipeline_stages_split_the_blocks_and_cost_a_bubble() -> None:
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.strategy=fsdp", "model.tie_embeddings=false",
                                                 "train.micro_batch_size=1"])
    flat = plan_layout(cfg, Layout(dp_shard=8), HW)
    pp = plan_layout(cfg, Layout(pp=2, dp_shard=4), HW)
    # Half the blocks on twice fewer FSDP ranks: about the same state, plus the output projection whole-ish.
    assert pp.state == pytest.approx(flat.state, rel=0.15)
    assert pp.bubble == pytest.approx(1 / pp.microbatches) and flat.bubble == 0
    assert pp.pp_s > 0 and pp.step_s > pp.compute_s


def test_llama3_405b_on_1024_gpus_fits_80_gb() -> None:
    cfg = load_config("configs/llama3-405b.yaml")
    own = plan_layout(cfg, Layout.from_config(cfg.parallel, 1024), HW)
    assert own.layout == Layout(pp=2, dp_shard=64, tp=8)
    assert own.peak < 80 * GIB, own.peak / GIB
    ranked = rank_layouts(cfg, 1024, HW)
    assert ranked and ranked[0].peak < 80 * GIB
    assert all(a.step_s <= b.step_s for a, b in zip(ranked, ranked[1:], strict=False) if b.peak < 80 * GIB)
    assert all(lay.tp <= 8 and cfg.model.num_layers % lay.pp == 0 for lay in candidate_layouts(cfg, 1024, HW))
    text = format_layouts(cfg, 1024, HW)
    assert "(config)" in text and "suggested: parallel.strategy=fsdp" in text


def test_cli_plan_prints_the_layouts_and_refuses_a_layout_that_cannot_run() -> None:
    proc = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1024")
    assert proc.returncode == 0, proc.stderr
    assert "N-D layouts on 1024 ranks" in proc.stdout and "pp 2 x dp_shard 64 x tp 8 (config)" in proc.stdout
    assert "suggested:" in proc.stdout
    bad = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1000")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "needs a multiple of 16 processes, but there are 1000" in bad.stderr, bad.stderr
    flag = cli("plan", "configs/llama3-405b.yaml", "--world-size", "1024", "--efficiency", "2")
    assert flag.returncode == 2 and "--efficiency must be in (0, 1]" in flag.stderr
