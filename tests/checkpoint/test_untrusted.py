"""Checkpoints are untrusted input: strict manifests, disk vs manifest in both directions, fallback on
any failure, and no code run from a checkpoint (issue: hardening §5)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from bigtrain import messages
from bigtrain.checkpoint.manager import verify
from bigtrain.checkpoint.manifest import MANIFEST_FILE, checksum_files, list_files, read_manifest
from bigtrain.errors import UserError
from tests.helpers import build_trainer, train

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=2",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5", "run.device=cpu", "log.console=false")


class Payload:
    """Unpickling this creates ``marker``: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "run"
    train(out, *TINY)
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest's sizes and checksums for the files now on disk (what an attacker can do:
    CRC32 catches accidents, not tampering)."""
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"] = checksum_files(ckpt, list_files(ckpt), fsync=False)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


def _resume(run: Path, resume: str) -> object:
    return build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *TINY, "train.max_steps=3",
                                                f"checkpoint.resume={resume}"])


@pytest.mark.parametrize("target", ["rank/rank_00000.pt", "dcp/.metadata"])
def test_a_pickle_payload_in_a_checkpoint_never_runs(run: Path, tmp_path: Path, target: str) -> None:
    run = _copy_run(run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    with open(ckpt / target, "wb") as fh:
        (torch.save if target.endswith(".pt") else pickle.dump)({"data": Payload(marker), "rng": {}}, fh)
    _reseal(ckpt)
    assert not verify(ckpt)[1] or target == "dcp/.metadata"  # sealed: only the format check can tell
    with pytest.raises(UserError, match="step_000002"):
        _resume(run, str(ckpt))  # an explicit checkpoint: refused
    assert not marker.exists()
    with messages.capture() as lines:
        trainer = _resume(run, "auto")  # auto: falls back to the older good checkpoint
    trainer.run_lock.release()
    assert trainer.step == 1, lines
    assert any("step_000002" in line and "skip" in line for line in lines), lines
    assert not marker.exists()


def test_manifest_fields_are_type_checked(run: Path, tmp_path: Path) -> None:
    run = _copy_run(run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    name = next(iter(manifest["files"]))
    for field, value, words in [("size", "12x", "'size' is str, expected int"),
                                ("size", True, "'size' is bool, expected int"),
                                ("crc32", 7, "'crc32' is int, expected str")]:
        broken = json.loads(json.dumps(manifest))
        broken["files"][name][field] = value
        (ckpt / MANIFEST_FILE).write_text(json.dumps(broken))
        _, problems = verify(ckpt)
        assert len(problems) == 1 and words in problems[0], problems
    for key, value, words in [("world_size", 0, "expected >= 1"), ("backend", "pickle", "not one of"),
                              ("files", [], "expected dict")]:
        broken = {**manifest, key: value}
        (ckpt / MANIFEST_FILE).write_text(json.dumps(broken))
        assert words in verify(ckpt)[1][0]
    broken = json.loads(json.dumps(manifest))
    broken["files"]["../../etc/passwd"] = broken["files"].pop(name)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(broken))
    assert "not a plain path inside the checkpoint" in verify(ckpt)[1][0]
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(ckpt).files == manifest["files"] and not verify(ckpt)[1]


def test_a_shard_deleted_with_its_manifest_entry_is_found_and_auto_falls_back(run: Path, tmp_path: Path) -> None:
    run = _copy_run(run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    shard = next(name for name in read_manifest(ckpt).files if name.endswith(".distcp"))
    (ckpt / shard).unlink()
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    del manifest["files"][shard]
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    _, problems = verify(ckpt)
    assert problems == [f"{ckpt / shard}: needed by this checkpoint but not in the manifest"]
    with messages.capture() as lines:
        trainer = _resume(run, "auto")
    trainer.run_lock.release()
    assert trainer.step == 1, lines  # the cheap pass before the resume already skips it, naming the shard
    assert any("step_000002 skipped" in line and "needed by this checkpoint" in line for line in lines), lines


def test_a_file_added_after_the_commit_is_reported(run: Path, tmp_path: Path) -> None:
    run = _copy_run(run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    extra = ckpt / "rank" / "extra.pt"
    extra.write_bytes(b"x")
    assert verify(ckpt)[1] == [f"{extra}: on disk but not in the manifest (added after the commit?)"]
