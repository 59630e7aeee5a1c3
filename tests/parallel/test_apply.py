"""Activation checkpointing and compile are applied in place: same names, same numbers; init is split-independent."""
from __future__ import annotations

import pytest
import torch

from bigtrain.model import ModelConfig, build_on_meta, materialize
from bigtrain.model.init import BLOCK_NUMEL, normal_range, seeded_filler
from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.sections import parse_section


def tiny(**kw: object) -> ModelConfig:
    base = {"vocab_size": 97, "dim": 48, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 32}
    return parse_section(ModelConfig, {**base, **kw}, "model")


def build(mode: str = "none", every: int = 2, compile: bool | str = False) -> torch.nn.Module:
    cfg = parse_section(ParallelConfig, {"activation_checkpointing": mode, "activation_checkpointing_every": every},
                        "parallel")
    model = parallelize(build_on_meta(tiny()), cfg, compile=compile)
    return materialize(model, "cpu", seed=0)


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 97, (2, 16), generator=gen), torch.randint(0, 97, (2, 16), generator=gen)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "every_k"])
def test_activation_checkpointing_same_loss_grads_and_keys(mode: str) -> None:
    ref, wrapped = build(), build(mode)
    assert list(wrapped.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in ref.named_parameters()]
    kinds = [type(b).__name__ for b in wrapped.layers.values()]
    assert kinds == (["CheckpointedBlock"] * 3 if mode == "full" else ["Block", "CheckpointedBlock", "Block"])
    (l0, g0), (l1, g1) = loss_and_grads(ref), loss_and_grads(wrapped)
    assert torch.equal(l0, l1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    wrapped.load_state_dict(ref.state_dict())  # checkpoints move between the two


def test_compile_runs_and_keeps_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-block compile through dynamo and AOTAutograd (graph capture, functionalization, the backward
    graph) with the ``aot_eager`` backend (``train.compile_backend``): inductor's CPU code generation would
    add 30-90 s on 2 cores and checks nothing of ours; bench/gpu_check.py runs inductor on a GPU."""
    backends: list[str | None] = []
    module_compile = torch.nn.Module.compile

    def spy(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        backends.append(kwargs.get("backend"))  # type: ignore[arg-type]
        module_compile(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    ref, compiled = build(), build("full", compile="aot_eager")
    assert backends == ["aot_eager"] * 3  # each block, with the backend asked for
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.modules()) >= 2  # each block
    assert list(compiled.state_dict()) == list(ref.state_dict())
    (l0, g0), (l1, g1) = loss_and_grads(ref), loss_and_grads(compiled)
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name


def test_init_blocks_do_not_depend_on_the_split() -> None:
    """Any contiguous range of a parameter (a shard) draws the same values as the whole tensor."""
    total = 2 * BLOCK_NUMEL + 1000
    whole = normal_range(total, 0, total, 0.02, 7, "w", torch.device("cpu"))
    for start, count in [(0, 5), (BLOCK_NUMEL - 3, 10), (BLOCK_NUMEL + 17, BLOCK_NUMEL), (total - 1, 1), (total, 0)]:
        part = normal_range(total, start, count, 0.02, 7, "w", torch.device("cpu"))
        assert torch.equal(part, whole[start: start + count]), (start, count)
    t = torch.empty(3, 5)
    seeded_filler(7)(t, 0.02, "w")
    assert torch.equal(t.flatten(), normal_range(15, 0, 15, 0.02, 7, "w", torch.device("cpu")))
    assert not torch.equal(whole[:15], normal_range(15, 0, 15, 0.02, 7, "other", torch.device("cpu")))
