"""A failed checkpoint save (disk full) is an error, not a crash; its partial files never look committed
(issue: hardening §4)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from bigtrain import cli
from bigtrain.checkpoint import dcp
from bigtrain.checkpoint.manager import CheckpointSaveError
from tests.helpers import read_metrics, train

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=3",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5", "checkpoint.at_end=false", "run.device=cpu")


@pytest.fixture
def disk_full_at_step_2(monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = dcp.save

    def save(state: dict, path: Path, process_group: object) -> None:
        if "step_000002" in str(path):
            (path / "__0_0.distcp").parent.mkdir(parents=True, exist_ok=True)
            (path / "__0_0.distcp").write_bytes(b"half a shard")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "__0_0.distcp"))
        real_save(state, path, process_group)

    monkeypatch.setattr(dcp, "save", save)


def _assert_only_step_1_committed(run: Path) -> None:
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000001"]  # no step_000002.tmp
    assert (checkpoints / "latest").read_text().strip() == "step_000001"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    assert Path(status["last_checkpoint"]).name == "step_000001"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "checkpoint"] == [1]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_removes_its_folder_and_marks_the_run_failed(tmp_path: Path, demo_data: Path,
                                                                   disk_full_at_step_2: None, async_save: bool) -> None:
    run = tmp_path / "run"
    with pytest.raises(CheckpointSaveError) as info:
        train(run, *TINY, f"checkpoint.async_save={str(async_save).lower()}")
    message = str(info.value)
    assert message.startswith("saving the checkpoint of step 2 failed: No space left on device")
    assert "step_000002.tmp was removed" in message and "latest still names step_000001" in message
    _assert_only_step_1_committed(run)


def test_the_cli_exits_1_with_one_paragraph(tmp_path: Path, demo_data: Path, disk_full_at_step_2: None,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    status = cli.main(["train", "configs/debug.yaml", f"run.out_dir={run}", *TINY, "log.console=false"])
    err = capfd.readouterr().err
    assert status == 1
    assert "Traceback" not in err and "bigtrain: error: saving the checkpoint of step 2 failed" in err
    _assert_only_step_1_committed(run)


def test_a_full_disk_inside_dcp_writer_threads_reads_as_one_line(tmp_path: Path, demo_data: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP wraps a writer thread's OSError in a CheckpointException whose text is a flattened traceback: the
    message names the OS error, not the traceback."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    real_save = dcp.save

    def save(state: dict, path: Path, process_group: object) -> None:
        if "step_000002" in str(path):
            error = OSError(errno.ENOSPC, "No space left on device", str(path / "__0_0.distcp"))
            raise CheckpointException("save failed", {0: (error, traceback.extract_stack())})
        real_save(state, path, process_group)

    monkeypatch.setattr(dcp, "save", save)
    with pytest.raises(CheckpointSaveError) as info:
        train(tmp_path / "run", *TINY)
    message = str(info.value)
    assert message.startswith("saving the checkpoint of step 2 failed: No space left on device (")
    assert "Traceback" not in message and "\n" not in message, message
    _assert_only_step_1_committed(tmp_path / "run")


def test_latest_that_is_a_directory_is_reported_as_what_happened(tmp_path: Path, demo_data: Path) -> None:
    """`checkpoints/latest` made a directory by hand: the save says so and lists what is committed, instead of
    claiming no checkpoint was ever committed."""
    run = tmp_path / "run"
    (run / "checkpoints" / "latest").mkdir(parents=True)
    with pytest.raises(CheckpointSaveError) as info:
        train(run, *TINY)
    message = str(info.value)
    assert "checkpoints/latest is not a file" in message and "Committed: step_000001" in message, message
    assert "no checkpoint of this run was committed before" not in message
