"""``model.kernels`` dispatch in the decoder, document-masked attention, and the kernels' config keys."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bigtrain import messages
from bigtrain.kernels import dispatch
from bigtrain.kernels.attention import attention, document_mask, positions_from_doc_ids
from bigtrain.model import ModelConfig, build_on_meta, materialize
from bigtrain.optim.optimizer import build_adamw
from bigtrain.sections import ConfigError, parse_section
from tests.kernels.kernel_testing import TOLERANCE, rel_err  # sets TRITON_INTERPRET=1 first

VOCAB = 97


def tiny(**kw: object) -> ModelConfig:
    base = {"vocab_size": VOCAB, "dim": 48, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 32}
    return parse_section(ModelConfig, {**base, **kw}, "model")


def test_import_bigtrain_loads_no_triton_or_torchao() -> None:
    """Not on import; and the default model (kernels: torch, fp8: false), built, parallelized and run,
    loads no Triton kernel module and no torchao. (torch itself may import triton once the model is
    built: torch._dynamo probes for it. That is torch's import, not bigtrain's.)"""
    code = ("import sys, torch, bigtrain, bigtrain.cli, bigtrain.train.trainer, bigtrain.kernels.dispatch;"
            "print(sorted(m for m in ('triton', 'torchao') if m in sys.modules));"
            "from bigtrain.model import build_on_meta, materialize, ModelConfig;"
            "from bigtrain.parallel.apply import parallelize; from bigtrain.parallel.config import ParallelConfig;"
            "m = materialize(parallelize(build_on_meta(ModelConfig()), ParallelConfig(), compile=False), 'cpu',"
            " seed=0);"
            "m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward();"
            "print(sorted(n for n in sys.modules if n == 'torchao' or n in ('bigtrain.kernels.rmsnorm',"
            "'bigtrain.kernels.rotary', 'bigtrain.kernels.swiglu', 'bigtrain.kernels._ce_triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]


def train_losses(cfg: ModelConfig, steps: int, doc_ids: torch.Tensor | None = None) -> list[float]:
    model = materialize(build_on_meta(cfg), "cpu", seed=0)
    opt = build_adamw(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    # One fixed batch (the loss must fall within a few steps); 2 x 8 tokens keep the interpreter quick.
    batch = torch.randint(0, VOCAB, (2, 9), generator=gen)
    losses = []
    for _ in range(steps):
        loss = model(batch[:, :-1], batch[:, 1:], doc_ids=doc_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_triton_kernels_track_torch_losses_in_training() -> None:
    """The interpreted Triton kernels and the torch reference train the same tiny model to the same losses."""
    doc_ids = torch.tensor([[0] * 3 + [1] * 5, [0] * 8], dtype=torch.int32)  # exercises the positions path
    torch_losses = train_losses(tiny(kernels="torch", z_loss=1e-4), 3, doc_ids)
    triton_losses = train_losses(tiny(kernels="triton", z_loss=1e-4), 3, doc_ids)
    assert torch_losses[-1] < torch_losses[0]
    for step, (a, b) in enumerate(zip(triton_losses, torch_losses, strict=True)):
        assert abs(a - b) <= 2e-2 * abs(b), f"step {step}: triton {a} vs torch {b}"


def _loss_and_grads(cfg: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward (bf16: under CPU autocast, as a bf16 run computes) on a fixed batch."""
    model = materialize(build_on_meta(cfg), "cpu", seed=0)
    with torch.no_grad():  # non-trivial norm gains, so the kernels' weight paths matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.linspace(0.5, 1.5, p.shape[0]).roll(len(name)))
    batch = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_triton_matches_torch(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.qk_norm with kernels=triton runs the q/k norms through the fused RMSNorm (rows of head_dim) and
    gives the torch reference's loss and gradients (fp32 1e-5, bf16 2e-2 norm-wise relative)."""
    from bigtrain.kernels import rmsnorm

    widths: list[int] = []
    fused = rmsnorm.rms_norm

    def spy(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        widths.append(x.shape[-1])
        return fused(x, weight, eps)

    monkeypatch.setattr(rmsnorm, "rms_norm", spy)
    cfg = tiny(qk_norm=True, num_layers=1, kernels="torch")
    want_loss, want = _loss_and_grads(cfg, dtype)
    got_loss, got = _loss_and_grads(tiny(qk_norm=True, num_layers=1, kernels="triton"), dtype)
    head_dim = cfg.head_dim
    assert widths.count(head_dim) == 2 * cfg.num_layers and widths.count(cfg.dim) == 2 * cfg.num_layers + 1
    tol = TOLERANCE[dtype]
    assert rel_err(got_loss, want_loss) <= tol, (got_loss, want_loss)
    assert got.keys() == want.keys() and "layers.0.attn.k_norm.weight" in got
    for name in want:
        assert rel_err(got[name], want[name]) <= tol, f"{name}: {rel_err(got[name], want[name]):.2e}"


def test_triton_requested_on_cpu_falls_back_to_reference_and_logs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(8)
    with messages.capture() as lines:
        assert not dispatch.use_triton("triton", x)
        y = dispatch.rms_norm(x, w, 1e-5, "triton")
        dispatch.rms_norm(x, w, 1e-5, "triton")
    assert torch.equal(y, dispatch.reference.rms_norm(x, w, 1e-5))
    assert len(lines) == 1 and "model.kernels=triton" in lines[0]
    assert "CUDA" in lines[0]
    assert "torch reference ops" in dispatch.describe("triton", torch.device("cpu"))
    assert not dispatch.use_triton("torch", x)


def test_positions_restart_at_each_document() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]], dtype=torch.int32)
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    mask = document_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]


def test_document_masked_model_equals_documents_run_separately() -> None:
    """Packing two documents in one row with doc ids gives each document's own (unpacked) logits."""
    model = materialize(build_on_meta(tiny()), "cpu", seed=0).eval()
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, VOCAB, (1, 5), generator=gen), torch.randint(0, VOCAB, (1, 7), generator=gen)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        sep = torch.cat([model(a), model(b)], dim=1)
        plain = model(packed)
    assert rel_err(out, sep) < 1e-5
    assert rel_err(plain[:, 5:], sep[:, 5:]) > 1e-3  # without doc ids the second document sees the first


def test_attention_without_doc_ids_is_plain_causal_sdpa() -> None:
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(attention(q, k, v), expected)
    same_doc = torch.zeros(2, 5, dtype=torch.long)
    assert rel_err(attention(q, k, v, same_doc), expected) < 1e-6


def test_kernels_config_keys() -> None:
    assert tiny().kernels == "torch" and tiny().fp8 is False and tiny().z_loss == 0.0
    with pytest.raises(ConfigError, match=r"model\.kernels.*'triton'"):
        tiny(kernels="tritonn")
    with pytest.raises(ConfigError, match=r"model\.z_loss"):
        tiny(z_loss=-1.0)
    with pytest.raises(ConfigError, match=r"model\.fp8.*divisible by 16"):
        tiny(dim=40, num_heads=4, num_kv_heads=2, fp8=True)
