"""Resume is bit-exact, and reshards: FSDP2 and DeepSpeed ZeRO-2/3 on 2 gloo ranks, 2 ranks -> 1.

The headline test of the checkpointing issue: train 2N steps straight (saving at N), then resume a
copy of the run from its step-N checkpoint and train N more. Per-step losses, gradient norms and
the final parameters must be identical bit for bit on the same world size (CPU, fp32), and equal
within 1e-6 relative on another world size (the reduction order changes). The same checkpoints
are exported to Hugging Face format and checked against ``transformers``' Llama.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, run_torchrun

N = 2
TINY = ["model.num_layers=2", "model.dim=64", "data.seq_len=128", "train.global_batch_tokens=1024",
        "train.micro_batch_size=2", "train.lr_warmup_steps=1", "train.precision=fp32", "log.every_steps=1",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu",
        f"train.max_steps={2 * N}", f"checkpoint.every_steps={N}", "checkpoint.keep_last=5"]
ENV = {"DS_ACCELERATOR": "cpu"}
TIMEOUT = 240


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r.get("kind") == "train"}


def train(out: Path, *overrides: str, nproc: int) -> None:
    args = ("train", "configs/debug.yaml", f"run.out_dir={out}", *TINY, *overrides)
    proc = (run_torchrun(*args, nproc=nproc, timeout=TIMEOUT, env=ENV) if nproc > 1
            else run_cli(*args, timeout=TIMEOUT, env=ENV))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def resume_copy(full: Path, dest: Path, *overrides: str, nproc: int) -> dict[int, dict]:
    """Copy the run folder, select its step-N checkpoint as latest, resume and train to 2N."""
    shutil.copytree(full, dest)
    (dest / "checkpoints" / "latest").write_text(f"step_{N:06d}\n")
    (dest / "metrics.jsonl").write_text("")
    train(dest, *overrides, "checkpoint.resume=auto", nproc=nproc)
    return records(dest)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from bigtrain.checkpoint.manager import load_model_weights

    weights, manifest = load_model_weights(run_dir / "checkpoints" / f"step_{2 * N:06d}")
    assert manifest.step == 2 * N
    return weights


def assert_resumed(full: Path, resumed: Path, *, rel: float = 0.0) -> None:
    want, got = records(full), records(resumed)
    assert sorted(got) == list(range(N + 1, 2 * N + 1)), sorted(got)
    for step, r in got.items():
        for key in ("loss", "grad_norm"):
            if rel == 0.0:
                assert r[key] == want[step][key], (step, key, r[key], want[step][key])
            else:
                assert r[key] == pytest.approx(want[step][key], rel=rel), (step, key)
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        if rel == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(b[name], a[name], rtol=rel, atol=rel * a[name].abs().max().item())


def assert_export_matches_transformers(run_dir: Path, out: Path) -> None:
    """`bigtrain export --to hf` of the final checkpoint: transformers' Llama gives the same logits."""
    transformers = pytest.importorskip("transformers")
    from bigtrain.config import config_from_dict
    from bigtrain.model import build_on_meta

    ckpt = run_dir / "checkpoints" / f"step_{2 * N:06d}"
    proc = run_cli("export", str(ckpt), "--to", "hf", str(out), timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    weights = final_weights(run_dir)
    cfg = config_from_dict(json.loads((ckpt / "manifest.json").read_text())["config"]).model
    model = build_on_meta(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)  # rotary tables; every weight is overwritten next
    model.load_state_dict(weights, strict=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_fsdp_resume_is_bitwise_and_reshards_to_one_rank(tmp_path: Path, demo_data: Path) -> None:
    full = tmp_path / "full"
    train(full, "parallel.strategy=fsdp", nproc=2)
    manifest = json.loads((full / "checkpoints" / f"step_{N:06d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "dcp"
    files = set(manifest["files"])
    assert {"rank/rank_00000.pt", "rank/rank_00001.pt"} <= files
    assert {name.split("_")[2] for name in files if name.endswith(".distcp")} == {"0", "1"}  # dcp/__RANK_N.distcp
    resume_copy(full, tmp_path / "again", "parallel.strategy=fsdp", nproc=2)
    assert_resumed(full, tmp_path / "again")
    # 2 ranks -> 1 process: DCP reshards the FSDP shards into whole tensors.
    resume_copy(full, tmp_path / "one", "parallel.strategy=single", nproc=1)
    assert_resumed(full, tmp_path / "one", rel=1e-6)
    assert_export_matches_transformers(full, tmp_path / "hf")


@pytest.mark.slow
def test_zero2_resume_is_bitwise_and_reshards(tmp_path: Path, demo_data: Path) -> None:
    pytest.importorskip("deepspeed")
    zero2 = ("parallel.strategy=zero", "parallel.zero.stage=2")
    full = tmp_path / "full"
    train(full, *zero2, nproc=2)
    resume_copy(full, tmp_path / "again", *zero2, nproc=2)
    assert_resumed(full, tmp_path / "again")
    # 2 ranks -> 1 through the universal format (stages 1/2 keep AdamW's step per parameter there).
    resume_copy(full, tmp_path / "one", *zero2, nproc=1)
    assert_resumed(full, tmp_path / "one", rel=1e-6)


@pytest.mark.slow
def test_zero3_resume_is_bitwise_reshards_and_exports(tmp_path: Path, demo_data: Path) -> None:
    pytest.importorskip("deepspeed")
    zero3 = ("parallel.strategy=zero", "parallel.zero.stage=3")
    full = tmp_path / "full"
    train(full, *zero3, nproc=2)
    ckpt = full / "checkpoints" / f"step_{N:06d}"
    assert json.loads((ckpt / "manifest.json").read_text())["backend"] == "deepspeed"
    resume_copy(full, tmp_path / "again", *zero3, nproc=2)
    assert_resumed(full, tmp_path / "again")
    # 2 ranks -> 1: converted to DeepSpeed's universal format on the fly, next to the checkpoint.
    resume_copy(full, tmp_path / "one", *zero3, nproc=1)
    assert (tmp_path / "one" / "checkpoints" / f"step_{N:06d}" / "universal" / "state").is_dir()
    assert_resumed(full, tmp_path / "one", rel=1e-6)
    assert_export_matches_transformers(full, tmp_path / "hf")
