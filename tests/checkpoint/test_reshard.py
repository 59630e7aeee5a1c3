"""Resume is bit-exact, and reshards: FSDP2 and DeepSpeed ZeRO-2/3 on 2 gloo ranks, 2 ranks -> 1.

The headline test of the checkpointing issue: train 2N steps straight (saving at N), then resume a
copy of the run from its step-N checkpoint and train N more. Per-step losses, gradient norms and
the final parameters must be identical bit for bit on the same world size (CPU), and equal within the
tolerance policy (tests/tolerance.py) on another world size, where the reduction order changes: FSDP2 runs
in fp64, DeepSpeed (fp32 master weights) in fp32. The same checkpoints
are exported to Hugging Face format and checked against ``transformers``' Llama.

The ranks are in-process (tests/helpers.py ``run_distributed``): one 2-rank launch trains and
resumes every backend, one 1-rank launch resumes each on one process and exports.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import run_distributed, train, train_records
from tests.tolerance import FP32_REL, FP64, FP64_REL, assert_weights_close

pytestmark = pytest.mark.slow  # one shared ~1 min of 2-rank and 1-rank training

N = 2
TINY = ["train.optimizer=adamw", "model.qk_norm=false", "model.num_layers=2", "model.dim=64", "data.seq_len=128",
        "train.global_batch_tokens=1024",
        "train.micro_batch_size=2", "train.lr_warmup_steps=1", "log.every_steps=1",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu",
        f"train.max_steps={2 * N}", f"checkpoint.every_steps={N}", "checkpoint.keep_last=5", "run.num_threads=1",
        # Tied (the demo config unties its output): on a world-size change, Adam amplifies rounding on an untied
        # embedding's near-zero gradient rows past 1e-6 (zero-3 2 -> 1: one element of 262,144 at 1.2e-5).
        "model.tie_embeddings=true"]
TIMEOUT = 600
ZERO2 = ["parallel.strategy=zero", "parallel.zero.stage=2", "train.precision=fp32"]
ZERO3 = ["parallel.strategy=zero", "parallel.zero.stage=3", "train.precision=fp32"]
# backend -> (overrides on 2 ranks, overrides for the 1-process resume, export the final checkpoint?)
# 2 ranks -> 1 process: DCP reshards FSDP shards into whole tensors for `single`; ZeRO goes through
# DeepSpeed's universal format (stages 1/2 keep AdamW's step per parameter there).
BACKENDS = {
    "fsdp": (["parallel.strategy=fsdp", FP64], ["parallel.strategy=single", FP64], True),
    "zero2": (ZERO2, ZERO2, False),
    "zero3": (ZERO3, ZERO3, True),
}


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in train_records(run_dir)}


def copy_for_resume(full: Path, dest: Path) -> None:
    """Copy the run folder and select its step-N checkpoint as latest (metrics start empty)."""
    shutil.copytree(full, dest)
    (dest / "checkpoints" / "latest").write_text(f"step_{N:06d}\n")
    (dest / "metrics.jsonl").write_text("")


def train_and_resume_on_two_ranks(rank: int, root: str, names: list[str]) -> None:
    """Each backend: train 2N steps straight ("full"), then resume a copy from step N ("again")."""
    import torch.distributed as dist

    for name in names:
        full, again = Path(root) / name / "full", Path(root) / name / "again"
        train(full, *TINY, *BACKENDS[name][0])
        if rank == 0:
            copy_for_resume(full, again)
        dist.barrier()
        train(again, *TINY, *BACKENDS[name][0], "checkpoint.resume=auto")


def resume_on_one_rank_and_export(rank: int, root: str, names: list[str]) -> None:
    """Each backend: resume a copy of the 2-rank run on one process ("one"); export its final checkpoint."""
    from bigtrain.export import export_checkpoint

    for name in names:
        full, one = Path(root) / name / "full", Path(root) / name / "one"
        copy_for_resume(full, one)
        train(one, *TINY, *BACKENDS[name][1], "checkpoint.resume=auto")
        if BACKENDS[name][2]:
            export_checkpoint(full / "checkpoints" / f"step_{2 * N:06d}", "hf", Path(root) / name / "hf")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    root = tmp_path_factory.mktemp("reshard")
    names = [n for n in BACKENDS if not n.startswith("zero") or importlib.util.find_spec("deepspeed")]
    run_distributed(train_and_resume_on_two_ranks, 2, str(root), names, timeout_s=TIMEOUT)
    run_distributed(resume_on_one_rank_and_export, 1, str(root), names, timeout_s=TIMEOUT)
    return root


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from bigtrain.checkpoint.manager import load_model_weights

    weights, manifest = load_model_weights(run_dir / "checkpoints" / f"step_{2 * N:06d}", as_fp32=False)
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
    if rel == 0.0:
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    else:
        assert_weights_close(b, a, rel, str(resumed))


def assert_export_matches_transformers(run_dir: Path, out: Path) -> None:
    """The HF export of the final checkpoint (written in the 1-rank launch): transformers' Llama gives the same
    logits."""
    transformers = pytest.importorskip("transformers")
    from bigtrain.config import config_from_dict
    from bigtrain.model import build_on_meta

    ckpt = run_dir / "checkpoints" / f"step_{2 * N:06d}"
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


def test_fsdp_resume_is_bitwise_and_reshards_to_one_rank(runs: Path) -> None:
    full = runs / "fsdp" / "full"
    manifest = json.loads((full / "checkpoints" / f"step_{N:06d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "dcp"
    files = set(manifest["files"])
    assert {"rank/rank_00000.pt", "rank/rank_00001.pt"} <= files
    assert {name.split("_")[2] for name in files if name.endswith(".distcp")} == {"0", "1"}  # dcp/__RANK_N.distcp
    assert_resumed(full, runs / "fsdp" / "again")
    # 2 ranks -> 1 process: DCP reshards the FSDP shards into whole tensors.
    assert_resumed(full, runs / "fsdp" / "one", rel=FP64_REL)
    assert_export_matches_transformers(full, runs / "fsdp" / "hf")


def test_zero2_resume_is_bitwise_and_reshards(runs: Path) -> None:
    pytest.importorskip("deepspeed")
    full = runs / "zero2" / "full"
    assert_resumed(full, runs / "zero2" / "again")
    # 2 ranks -> 1 through the universal format (stages 1/2 keep AdamW's step per parameter there).
    assert_resumed(full, runs / "zero2" / "one", rel=FP32_REL)


def test_zero3_resume_is_bitwise_reshards_and_exports(runs: Path) -> None:
    pytest.importorskip("deepspeed")
    full = runs / "zero3" / "full"
    ckpt = full / "checkpoints" / f"step_{N:06d}"
    assert json.loads((ckpt / "manifest.json").read_text())["backend"] == "deepspeed"
    assert_resumed(full, runs / "zero3" / "again")
    # 2 ranks -> 1: converted to DeepSpeed's universal format on the fly, next to the checkpoint.
    assert (runs / "zero3" / "one" / "checkpoints" / f"step_{N:06d}" / "universal" / "state").is_dir()
    assert_resumed(full, runs / "zero3" / "one", rel=FP32_REL)
    assert_export_matches_transformers(full, runs / "zero3" / "hf")
