"""Muon (train.optimizer=muon): the Newton-Schulz iteration, one update against a float64 reference, which
parameters it owns, fp64 parity (the tolerance policy) of ddp / fsdp / fsdp+tp with single on 2 ranks, bitwise
resume, the refusal under ZeRO, and `bigtrain plan`'s count of its state.

One 2-rank in-process launch trains every distributed case in turn (tests/helpers.py ``run_distributed``);
the single-process reference trains in the pytest process.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bigtrain.config import load_config
from bigtrain.model import build_on_meta
from bigtrain.model.config import PRESETS
from bigtrain.optim.muon import Muon, build_muon, newton_schulz, split_parameters
from bigtrain.plan import plan_memory
from tests.helpers import build_trainer, cli, overriding, run_distributed, train, train_records
from tests.tolerance import FP64, FP64_REL, assert_runs_close

STEPS = 4
N = STEPS // 2  # resume point of the bitwise test (train 2N straight vs resume at N)
TINY = ["model.num_layers=2", "model.dim=64", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=64",
        "train.global_batch_tokens=512", "train.micro_batch_size=2", FP64, "run.device=cpu",
        "train.optimizer=muon", "train.lr=3e-3", "train.lr_warmup_steps=2", "train.muon.adamw_lr=1e-3",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "checkpoint.at_end=false",
        "log.sample_at_end=false", "run.num_threads=1", f"train.max_steps={STEPS}"]
FSDP = "parallel.strategy=fsdp"
# name -> overrides on 2 ranks; each is compared with the single-process run. The fsdp run saves at N and at
# the end (saving changes no number), so it is also the "straight" half of the bitwise resume test.
LAYOUTS = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": [FSDP, f"checkpoint.every_steps={N}", "checkpoint.keep_last=5", "checkpoint.at_end=true"],
    "tp2": [FSDP, "parallel.tensor_parallel=2"],  # tensor-parallel DTensors: gathered whole the same way
}


# --------------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 64)])
def test_newton_schulz_is_near_orthogonal_and_matches_float64(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, 5)
    assert out.dtype == torch.float32 and out.shape == g.shape  # fp32 on CPU
    singular = torch.linalg.svdvals(out.double())
    # The quintic's fixed band: singular values end near [0.7, 1.2] (not exactly 1, by design).
    assert singular.min().item() > 0.5 and singular.max().item() < 1.5, singular
    reference = newton_schulz(g.double(), 5, torch.float64)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5)


def muon_step_float64(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, *, lr: float, wd: float,
                      beta: float, nesterov: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm written out in float64: momentum, Nesterov, 5 quintic steps, RMS matching, decay."""
    a, b, c = 3.4445, -4.7750, 2.0315
    buf = beta * buf + grad
    x = grad + beta * buf if nesterov else buf
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    scale = 0.2 * math.sqrt(max(p.shape))
    return p * (1 - lr * wd) - lr * scale * x, buf


class _OneBlock(nn.Module):
    """Just enough of a Decoder for build_muon: a Block (whose linears Muon owns) and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        cfg = load_config("configs/debug.yaml", ["model.num_layers=1", "model.dim=32", "model.num_heads=2",
                                                         "model.num_kv_heads=2"]).model
        from bigtrain.model.decoder import Block

        self.tok_embeddings = nn.Embedding(40, 32)
        self.layers = nn.ModuleDict({"0": Block(cfg)})


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_equals_float64_reference(nesterov: bool) -> None:
    torch.manual_seed(0)
    model = _OneBlock()
    opt = build_muon(model, lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                     nesterov=nesterov, ns_steps=5)
    w = model.layers["0"].ffn.w1.weight  # type: ignore[union-attr]  # a Linear inside the Block
    p64, buf64 = w.detach().double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for _ in range(3):
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        p64, buf64 = muon_step_float64(p64, w.grad.double(), buf64, lr=0.02, wd=0.1, beta=0.95,  # type: ignore[union-attr]  # set just above
                                       nesterov=nesterov)
        opt.step()
        torch.testing.assert_close(w.detach().double(), p64, rtol=0, atol=2e-6)
    assert set(opt.state[w]) == {"momentum_buffer"}


def test_adamw_half_equals_torch_adamw_at_its_own_lr() -> None:
    """The AdamW groups are torch's AdamW, at train.muon.adamw_lr (the scheduled lr times adamw_lr / lr)."""
    torch.manual_seed(0)
    model = _OneBlock()
    twin = _OneBlock()
    twin.load_state_dict(model.state_dict())
    opt = build_muon(model, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                     nesterov=True, ns_steps=5, adamw_lr=0.003)
    ref = torch.optim.AdamW([{"params": [twin.tok_embeddings.weight], "weight_decay": 0.1},
                             {"params": [p for n, p in twin.named_parameters() if p.ndim == 1], "weight_decay": 0.0}],
                            lr=0.003, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        scheduled = 0.01 * (step + 1) / 3  # the trainer writes the schedule's lr into every group
        for group in opt.param_groups:
            group["lr"] = scheduled
        for group in ref.param_groups:
            group["lr"] = scheduled * 0.3
        for q, r in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = torch.randn_like(q)
            r.grad = q.grad.clone()
        opt.step()
        ref.step()
    for (name, q), r in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.ndim == 1 or name.startswith("tok_"):
            torch.testing.assert_close(q, r, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_muon_owns_exactly_the_block_linears(preset: str, tied: bool) -> None:
    cfg = load_config("configs/debug.yaml", [f"model.preset={preset}", f"model.tie_embeddings={str(tied).lower()}"])
    model = build_on_meta(cfg.model)
    muon, decay, no_decay = split_parameters(model)
    attention = {"attn.wq", "attn.wk", "attn.wv", "attn.wo"}
    dense = {"ffn.w1", "ffn.w2", "ffn.w3"}
    moe = cfg.model.moe
    sparse = range(moe.first_dense_layers if moe else cfg.model.num_layers, cfg.model.num_layers)
    shared = {"ffn.shared.w1", "ffn.shared.w2", "ffn.shared.w3"} if moe and moe.num_shared_experts else set()
    want = {f"layers.{i}.{leaf}.weight" for i in range(cfg.model.num_layers)
            for leaf in attention | (shared if i in sparse and moe else dense)}
    assert {n for n, _ in muon} == want
    # MoE: the routers and the routed experts' 3-D stacks go to AdamW with weight decay.
    routed = {f"layers.{i}.ffn.{leaf}" for i in sparse for leaf in ("router.gate.weight", "experts.w1",
                                                                      "experts.w2", "experts.w3")} if moe else set()
    assert {n for n, _ in decay} == {"tok_embeddings.weight"} | (set() if tied else {"output.weight"}) | routed
    assert all(p.ndim == 1 for _, p in no_decay) and "norm.weight" in {n for n, _ in no_decay}
    counted = len(muon) + len(decay) + len(no_decay)
    assert counted == len(list(model.parameters()))


def test_muon_with_zero_is_a_user_error_naming_fsdp(tmp_path: Path) -> None:
    result = cli("config", "check", "configs/debug.yaml", "train.optimizer=muon", "parallel.strategy=zero")
    assert result.returncode == 2, result
    text = result.stdout + result.stderr
    assert "train.optimizer" in text and "parallel.strategy=fsdp" in text and "Traceback" not in text, text


def test_plan_counts_one_momentum_per_muon_matrix() -> None:
    from bigtrain.errors import UserError

    tiny32 = overriding(TINY, "train.precision=fp32")  # fp32 moments: 4 bytes each
    cfg = load_config("configs/debug.yaml", tiny32)
    adamw = load_config("configs/debug.yaml", [*tiny32, "train.optimizer=adamw"])
    muon_params, _, _ = split_parameters(build_on_meta(cfg.model))
    n_muon = sum(p.numel() for _, p in muon_params)
    single = plan_memory(cfg, 1, "single", device="cpu")
    assert plan_memory(adamw, 1, "single", device="cpu").optimizer - single.optimizer == 4 * (n_muon + len(muon_params))
    fsdp, fsdp_adamw = plan_memory(cfg, 2, "fsdp", device="cpu"), plan_memory(adamw, 2, "fsdp", device="cpu")
    assert fsdp_adamw.optimizer - fsdp.optimizer == 4 * (n_muon // 2 + len(muon_params))  # dims are even here
    assert fsdp.buffers > fsdp_adamw.buffers  # one gathered matrix for Newton-Schulz
    with pytest.raises(UserError, match=r"zero-2 does not run train.optimizer=muon; plan fsdp or ddp instead"):
        plan_memory(cfg, 2, "zero2", device="cpu")
    # fp64 (the parity runs' precision): every moment takes 8 bytes, the step scalars stay fp32.
    fp64_single = plan_memory(load_config("configs/debug.yaml", TINY), 1, "single", device="cpu")
    fp64_adamw = plan_memory(load_config("configs/debug.yaml", [*TINY, "train.optimizer=adamw"]), 1, "single",
                             device="cpu")
    assert fp64_adamw.optimizer - fp64_single.optimizer == 8 * n_muon + 4 * len(muon_params)
    assert fp64_single.params == fp64_single.grads == 2 * single.params
    plan = cli("plan", "configs/debug.yaml", *tiny32, "--world-size", "2")
    assert plan.returncode == 0, plan
    assert "zero-" not in plan.stdout and "Muon: 1 fp32 momentum" in plan.stdout, plan.stdout


# --------------------------------------------------------------------------------------------- distributed


def train_layouts(rank: int, root: str) -> dict[str, Any]:
    """In every rank: each parity layout for STEPS = 2N steps, then the fsdp run resumed from step N."""
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for name, overrides in LAYOUTS.items():
        train(Path(root) / name, *TINY, *overrides)
        out[name] = train_records(Path(root) / name) if rank == 0 else None
    full, again = Path(root) / "fsdp", Path(root) / "fsdp-resumed"
    if rank == 0:
        shutil.copytree(full, again)
        (again / "checkpoints" / "latest").write_text(f"step_{N:06d}\n")
        (again / "metrics.jsonl").write_text("")
    dist.barrier()
    train(again, *TINY, *LAYOUTS["fsdp"], "checkpoint.resume=auto")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("muon")
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={root / 'single'}", *TINY, "log.console=false"])
    threads = torch.get_num_threads()
    try:
        trainer.fit()
        held = trainer.strategy.held_state_bytes(trainer.model, trainer.optimizer)
    finally:
        trainer.loader.close()
        torch.set_num_threads(threads)
    results: dict[str, Any] = run_distributed(train_layouts, 2, str(root), timeout_s=600)[0]
    results["single"] = train_records(root / "single")
    results["single-held"] = held
    results["root"] = root
    return results


def test_single_trains_and_plan_matches_its_optimizer_state(runs: dict[str, Any]) -> None:
    single = runs["single"]
    assert [r["step"] for r in single] == list(range(1, STEPS + 1))
    assert single[-1]["loss"] < single[0]["loss"]
    cfg = load_config("configs/debug.yaml", TINY)
    assert runs["single-held"]["optimizer"] == plan_memory(cfg, 1, "single", device="cpu").optimizer


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_ranks_match_single(runs: dict[str, Any], name: str) -> None:
    assert_runs_close(runs[name], runs["single"], FP64_REL, name)


def test_fsdp_resume_is_bitwise(runs: dict[str, Any]) -> None:
    from bigtrain.checkpoint.manager import load_model_weights

    full, again = runs["root"] / "fsdp", runs["root"] / "fsdp-resumed"
    want = {r["step"]: r for r in train_records(full)}
    got = {r["step"]: r for r in train_records(again)}
    assert sorted(got) == list(range(N + 1, STEPS + 1))
    for step, r in got.items():
        assert (r["loss"], r["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"]), step
    a, _ = load_model_weights(full / "checkpoints" / f"step_{STEPS:06d}")
    b, _ = load_model_weights(again / "checkpoints" / f"step_{STEPS:06d}")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_optimizer_class_is_one_object() -> None:
    """The trainer builds one Muon object holding both halves (what checkpoints and the schedule see)."""
    from bigtrain.train.trainer import optimizer_factory

    cfg = load_config("configs/debug.yaml", TINY)
    model = build_on_meta(cfg.model)
    model.to_empty(device="cpu")
    opt = optimizer_factory(cfg.train)(model)
    assert isinstance(opt, Muon)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    assert opt.param_groups[1]["lr_ratio"] == pytest.approx(1e-3 / 3e-3)
