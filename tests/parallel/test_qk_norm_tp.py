"""QK-norm under tensor (+ sequence) parallelism: one forward + backward of a tiny model on 2 gloo ranks
equals the single-process one (fp64, the tolerance policy of tests/tolerance.py: loss and every gradient within
FP64_REL).

The q/k norm weights are replicated over the tensor-parallel ranks while each rank normalizes only its
own heads, so their gradients are partial sums the plan must reduce; a missing reduction shows up here
as a gradient about half the right size. Cheaper than a layout in test_nd_parity.py (no trainer, no data).
"""
from __future__ import annotations

from typing import Any

import torch

from tests.helpers import run_distributed
from tests.tolerance import FP64_REL

SHAPE: dict[str, Any] = {"vocab_size": 96, "dim": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                         "max_seq_len": 16, "qk_norm": True, "norm_eps": 1e-5}
SEED = 5
TOL = FP64_REL


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = grad.detach().clone()
    return out


def _non_trivial_norms(model: torch.nn.Module) -> None:
    """Norm gains other than ones (a fixed function of the name), so a mis-sharded gain cannot pass."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                values = torch.linspace(0.5, 1.5, p.shape[0], dtype=p.dtype).roll(len(name))
                if isinstance(p, DTensor):
                    p.copy_(DTensor.from_local(values, p.device_mesh, p.placements))
                else:
                    p.copy_(values)


def _single() -> tuple[float, dict[str, torch.Tensor]]:
    from bigtrain.model import ModelConfig, build_on_meta, materialize

    model = materialize(build_on_meta(ModelConfig(**SHAPE), torch.float64), "cpu", seed=SEED)
    _non_trivial_norms(model)
    loss = model(*_batch())
    loss.backward()
    return loss.item(), _grads(model)


def _tp2(rank: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """This rank's TP2 loss, and per parameter (max |grad - single grad|, max |single grad|)."""
    from torch.distributed.device_mesh import init_device_mesh

    from bigtrain.model import ModelConfig, build_on_meta
    from bigtrain.parallel.init import sharded_filler
    from bigtrain.parallel.tp import apply_tensor_parallel

    torch.set_num_threads(1)
    want_loss, want = _single()
    model = build_on_meta(ModelConfig(**SHAPE), torch.float64)
    apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    model.to_empty(device="cpu")
    model.init_weights(SEED, fill=sharded_filler(SEED))
    _non_trivial_norms(model)
    loss = model(*_batch())
    loss.backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    errs = {n: ((got[n] - want[n]).abs().max().item(), want[n].abs().max().item()) for n in want}
    return loss.item() - want_loss, errs


def test_qk_norm_tensor_parallel_matches_single() -> None:
    for loss_diff, errs in run_distributed(_tp2, 2, process_group=True, timeout_s=120):
        assert abs(loss_diff) <= TOL, loss_diff
        assert "layers.0.attn.q_norm.weight" in errs and "layers.1.attn.k_norm.weight" in errs
        for name, (err, scale) in errs.items():
            assert scale > 0, name
            assert err <= TOL * max(1.0, scale), f"{name}: max |tp2 - single| {err:.2e} (grad scale {scale:.2e})"
