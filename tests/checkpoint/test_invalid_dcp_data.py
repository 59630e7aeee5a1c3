"""A checkpoint whose files pass their CRCs but are not valid DCP data (issue 28): ``checkpoint.resume=auto``
skips it with a one-line note and resumes from the older checkpoint, bit for bit as a resume from that one;
an explicit ``checkpoint.resume=PATH``, ``generate`` and ``export`` say what is wrong in one line and exit 2.

Each case damages the step-2 checkpoint of a tiny run (checkpoints at steps 1 and 2) and reseals its manifest
with the new sizes and CRCs, as anyone who can write the folder can (CRC32 catches accidents, not tampering).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain import messages
from bigtrain.checkpoint.dcp import read_metadata_file
from bigtrain.checkpoint.manifest import MANIFEST_FILE, checksum_files, list_files
from tests.helpers import build_trainer, cli, overriding, train, train_records

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=2",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5", "run.device=cpu", "log.console=false",
        "run.num_threads=2")
STEP2 = Path("checkpoints") / "step_000002"
# What torch's refused weights_only load advises; never worth passing on (it would run the file's code).
TORCH_ADVICE = "weights_only` set to `False`"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("invalid-dcp") / "run"
    train(out, *TINY)
    return out


# ---------------------------------------------------------------------------------------------- the damage
def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest's sizes and CRCs for the files now on disk."""
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"] = checksum_files(ckpt, list_files(ckpt), fsync=False)
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


def _model_storage(dcp: Path) -> tuple[Path, int, int]:
    """(shard file, offset, length) of the model's embedding: damage there reaches generate and export too
    (which shard holds it depends on the writer threads, i.e. on the machine's cores)."""
    metadata = read_metadata_file(dcp / ".metadata")
    info = next(info for key, info in metadata.storage_data.items() if key.fqn == "model.tok_embeddings.weight")
    return dcp / info.relative_path, info.offset, info.length


def _random_shard(dcp: Path) -> None:
    shard, _, _ = _model_storage(dcp)
    shard.write_bytes(os.urandom(shard.stat().st_size))


def _truncated_shard(dcp: Path) -> None:
    """Cut in the middle of the embedding's record."""
    shard, offset, length = _model_storage(dcp)
    shard.write_bytes(shard.read_bytes()[: offset + length // 2])


def _write_metadata(dcp: Path, obj: Any) -> None:
    with open(dcp / ".metadata", "wb") as fh:
        pickle.dump(obj, fh)


def _edit_metadata(edit: Callable[[Any], None]) -> Callable[[Path], None]:
    """Rewrite ``.metadata`` as a DCP ``Metadata`` (only classes the unpickler admits) changed by ``edit``."""
    def damage(dcp: Path) -> None:
        metadata = read_metadata_file(dcp / ".metadata")
        edit(metadata)
        _write_metadata(dcp, metadata)
    return damage


def _path_as_storage_meta(metadata: Any) -> None:
    metadata.storage_meta = Path("elsewhere")  # an admitted class, in a field that holds a StorageMeta


def _params_stored_as_a_number(metadata: Any) -> None:
    """The optimizer's parameter list read from where its learning rate is stored (a float)."""
    index = {key.fqn: key for key in metadata.storage_data}
    params = next(fqn for fqn in index if fqn.startswith("optimizer.param_groups.") and fqn.endswith(".params"))
    lr = params[: -len("params")] + "lr"
    storage = metadata.storage_data
    storage[index[params]], storage[index[lr]] = storage[index[lr]], storage[index[params]]


def _a_weight_left_out(metadata: Any) -> None:
    """Metadata describing another model: one weight is not in it."""
    name = next(fqn for fqn in metadata.state_dict_metadata if fqn.startswith("model.layers.0.attn."))
    del metadata.state_dict_metadata[name]
    for key in [key for key in metadata.storage_data if key.fqn == name]:
        del metadata.storage_data[key]


CASES: dict[str, Callable[[Path], None]] = {
    "shard-of-random-bytes": _random_shard,
    "shard-truncated": _truncated_shard,
    "metadata-another-admitted-object": lambda dcp: _write_metadata(dcp, torch.Size([3, 4])),
    "metadata-field-of-the-wrong-class": _edit_metadata(_path_as_storage_meta),
    "metadata-item-read-from-the-wrong-place": _edit_metadata(_params_stored_as_a_number),
    "metadata-of-another-model": _edit_metadata(_a_weight_left_out),
}


def _damaged_copy(run: Path, tmp_path: Path, case: str) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    CASES[case](target / STEP2 / "dcp")
    _reseal(target / STEP2)
    return target


def _one_error_line(result: Any) -> str:
    """The verb's error: exit 2, no traceback, the last line of stderr (nothing after it), no torch advice."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and TORCH_ADVICE not in result.stderr, result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("bigtrain: error: ") and "step_000002" in last, result.stderr
    return last


# ---------------------------------------------------------------------------------------------- the verbs
@pytest.mark.parametrize("case", list(CASES))
def test_auto_resume_skips_it_with_one_line_and_resumes_from_the_older_one(run: Path, tmp_path: Path,
                                                                           case: str) -> None:
    run = _damaged_copy(run, tmp_path, case)
    with messages.capture() as lines:
        trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={run}", *overriding(TINY, "train.max_steps=3"),
                                                       "checkpoint.resume=auto"])
    trainer.run_lock.release()
    trainer.loader.close()
    assert trainer.step == 1 and trainer.resume_from == run / "checkpoints" / "step_000001", lines
    notes = [line for line in lines if "step_000002" in line]
    assert len(notes) == 1 and "skip" in notes[0] and "\n" not in notes[0], lines
    assert TORCH_ADVICE not in notes[0], notes


@pytest.mark.parametrize("case", list(CASES))
def test_an_explicit_resume_from_it_is_one_line_and_exit_2(run: Path, tmp_path: Path, case: str) -> None:
    run = _damaged_copy(run, tmp_path, case)
    result = cli("train", "configs/debug.yaml", f"run.out_dir={run}", *overriding(TINY, "train.max_steps=3"),
                 f"checkpoint.resume={run / STEP2}")
    _one_error_line(result)
    assert len(train_records(run)) == 2  # nothing trained


# The misplaced optimizer item leaves the model's weights intact: generate and export read only those.
MODEL_DAMAGED = [case for case in CASES if case != "metadata-item-read-from-the-wrong-place"]


@pytest.mark.parametrize("case", MODEL_DAMAGED)
def test_generate_and_export_of_it_are_one_line_and_exit_2(run: Path, tmp_path: Path, case: str) -> None:
    run = _damaged_copy(run, tmp_path, case)
    _one_error_line(cli("generate", str(run / STEP2), "--max-new-tokens", "4", "--device", "cpu"))
    for to in ("hf", "torch"):
        out = tmp_path / f"export-{to}"
        _one_error_line(cli("export", str(run / STEP2), "--to", to, str(out)))
        assert not out.exists()


@pytest.mark.parametrize("case", ["shard-of-random-bytes", "metadata-item-read-from-the-wrong-place"])
def test_the_fallback_trains_bit_for_bit_as_a_resume_from_the_older_checkpoint(run: Path, tmp_path: Path,
                                                                               case: str) -> None:
    """The failed load of step 2 (here after the model's weights were read, for the second case) leaves nothing
    behind: the run continues exactly as one resumed from step 1 directly."""
    damaged = _damaged_copy(run, tmp_path / "damaged", case)
    direct = tmp_path / "direct" / "run"
    shutil.copytree(run, direct)
    for folder, resume in ((damaged, "auto"), (direct, str(direct / "checkpoints" / "step_000001"))):
        (folder / "metrics.jsonl").write_text("")
        train(folder, *overriding(TINY, "train.max_steps=4", f"checkpoint.resume={resume}"))
    got, want = train_records(damaged), train_records(direct)
    assert [r["step"] for r in got] == [2, 3, 4]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in got] == [(r["step"], r["loss"], r["grad_norm"])
                                                                    for r in want]
