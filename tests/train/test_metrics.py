"""MFU and peak-FLOPs math (bigtrain/train/metrics.py) with the model's FLOPs per token."""
from __future__ import annotations

import pytest
import torch

from bigtrain.model import ModelConfig, count_parameters, flops_per_token
from bigtrain.sections import parse_section
from bigtrain.train import metrics
from bigtrain.train.metrics import PEAK_BF16_FLOPS, bits_per_byte, mfu, peak_flops

CUDA = torch.device("cuda", 0)


def peak_for(name: str, monkeypatch: pytest.MonkeyPatch) -> float | None:
    monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda device=None: name)
    return peak_flops(CUDA)


def test_no_peak_on_the_cpu() -> None:
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),  # not the SXM number, though the name contains "H100"
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 70e12),
    ("NVIDIA L40S", 362e12),  # not the L4's number
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("AMD Instinct MI300X", 1307e12),
    ("NVIDIA GeForce GTX 1080", None),  # unknown: MFU is reported as n/a
])
def test_peak_by_device_name(device_name: str, peak: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_for(device_name, monkeypatch) == peak


def test_every_table_entry_is_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device named exactly like an entry gets that entry's peak: no earlier, shorter key shadows it
    with another number (the table is matched by substring, first match wins)."""
    for key, peak in PEAK_BF16_FLOPS:
        assert peak_for(f"NVIDIA {key}", monkeypatch) == peak, key


def test_mfu_is_achieved_over_peak_flops() -> None:
    assert mfu(1000.0, 6e9, 1e15) == pytest.approx(1000.0 * 6e9 / 1e15) == pytest.approx(0.006)
    assert mfu(0.0, 6e9, 1e15) == 0.0
    assert mfu(1000.0, 6e9, None) is None and mfu(1000.0, 6e9, 0.0) is None  # unknown peak: n/a


def test_mfu_of_gpt2_small_on_an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worked example: GPT-2 small (124M, tied) at seq_len 1024 is 0.86 GFLOP/token for training;
    400k tokens/s on one H100 SXM is 34.6% MFU."""
    cfg = parse_section(ModelConfig, {"preset": "gpt2-124m"}, "model")
    per_token = flops_per_token(cfg, 1024)
    assert per_token == 6 * 123_587_328 + 12 * 12 * 12 * 64 * 1024
    assert mfu(400_000.0, per_token, peak_for("NVIDIA H100 80GB HBM3", monkeypatch)) == pytest.approx(
        400_000 * per_token / 989e12, rel=1e-12)
    assert mfu(400_000.0, per_token, 989e12) == pytest.approx(0.3457, abs=1e-4)


def test_flops_per_token_with_grouped_query_attention_and_untied_output() -> None:
    """6 N for the matmuls (forward + backward), plus 12 L H Q T for attention scores over query heads
    (kv heads shrink N, not the score FLOPs); an untied output projection adds vocab x dim to N."""
    shape = {"vocab_size": 100, "dim": 8, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden_dim": 16,
             "max_seq_len": 32}
    cfg = parse_section(ModelConfig, {**shape, "tie_embeddings": True}, "model")
    # per block: wq 8x8, wk/wv 8x4 each, wo 8x8, SwiGLU 3 x 8x16, two norms of 8
    per_block = 64 + 2 * 32 + 64 + 3 * 128 + 16
    n = 2 * per_block + 8 + 100 * 8  # final norm, tied embedding once
    assert count_parameters(cfg) == n == 1992
    assert flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 2 * 4 * 32 == 18096
    assert flops_per_token(cfg, 64) - flops_per_token(cfg, 32) == 12 * 2 * 2 * 4 * 32  # linear in seq_len
    untied = parse_section(ModelConfig, {**shape, "tie_embeddings": False}, "model")
    assert flops_per_token(untied, 32) - flops_per_token(cfg, 32) == 6 * 100 * 8


def test_bits_per_byte() -> None:
    import math

    assert bits_per_byte(math.log(2) * 80, 10) == pytest.approx(8.0)  # 1 bit per nat/ln2, over 10 bytes
    assert bits_per_byte(5.0, 0) == pytest.approx(5.0 / math.log(2))  # no division by zero
