"""model.fp8: torchao float8 linears applied from outside the model (emulated on CPU).

That fp8=false never imports torchao is checked in test_kernels_model.py (one subprocess for both).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from bigtrain.errors import UserError
from bigtrain.model import ModelConfig, build_on_meta, materialize
from bigtrain.optim.optimizer import build_adamw
from bigtrain.parallel import apply
from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig
from bigtrain.sections import parse_section


def debug_cfg(**kw: object) -> ModelConfig:
    return parse_section(ModelConfig, {"preset": "debug", **kw}, "model")


def test_fp8_emulation_trains_the_debug_model() -> None:
    cfg = debug_cfg(fp8=True)
    model = parallelize(build_on_meta(cfg), ParallelConfig(), compile=False)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layers.0.attn.wq"] == "Float8Linear" and kinds["layers.3.ffn.w2"] == "Float8Linear"
    assert sum(k == "Float8Linear" for k in kinds.values()) == 7 * cfg.num_layers
    assert list(model.state_dict()) == list(build_on_meta(debug_cfg()).state_dict())  # same checkpoint keys
    materialize(model, "cpu", seed=0)
    opt = build_adamw(model, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    batch = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    # Same start as the bf16/fp32 model: FP8 changes the matmul precision, not the weights.
    ref = materialize(build_on_meta(debug_cfg()), "cpu", seed=0)
    with torch.no_grad():
        assert abs(ref(batch[:, :-1], batch[:, 1:]).item() - losses[0]) < 0.05


def test_fp8_without_torchao_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'bigtrain\[fp8\]'"):
        apply.apply_fp8(build_on_meta(debug_cfg(fp8=True)))


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(UserError, match=r"sm_80.*model\.fp8=false"):
        apply.apply_fp8(build_on_meta(debug_cfg(fp8=True)))
