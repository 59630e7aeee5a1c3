"""`bigtrain generate` and `bigtrain export` validate their arguments and never leave partial output
(issue: hardening §4 and §6). In-process through ``bigtrain.cli.main``: exit status, one message, no traceback."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from bigtrain import cli
from tests.helpers import train

TINY = ("data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=1",
        "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "run.device=cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    out = tmp_path_factory.mktemp("tools") / "run"
    train(out, *TINY)
    return out


def _main(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return status, err


@pytest.mark.parametrize("args, words", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--num-samples", "-2"], "--num-samples must be >= 1"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
])
def test_generate_refuses_bad_numbers(run: Path, capfd: pytest.CaptureFixture[str], args: list[str],
                                      words: str) -> None:
    status, err = _main(capfd, "generate", str(run), *args)
    assert status == 2 and words in err, err


def test_generate_on_cuda_without_a_gpu(run: Path, capfd: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    status, err = _main(capfd, "generate", str(run), "--device", "cuda")
    assert status == 2 and "no CUDA device is visible" in err


@pytest.mark.parametrize("verb", [["generate"], ["export", "--to", "torch"]])
def test_tools_speak_their_own_words_for_a_folder_without_checkpoints(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                                      verb: list[str]) -> None:
    status, err = _main(capfd, *verb[:1], str(tmp_path), *verb[1:], *(["out.pt"] if verb[0] == "export" else []))
    assert status == 2 and "holds no committed checkpoint" in err, err
    assert "checkpoint.resume" not in err and "'auto'" not in err


def test_export_refuses_to_overwrite_without_the_flag(run: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "model.pt"
    assert _main(capfd, "export", str(run), "--to", "torch", str(target))[0] == 0
    first = target.stat().st_mtime_ns
    status, err = _main(capfd, "export", str(run), "--to", "torch", str(target))
    assert status == 2 and "pass --overwrite" in err and target.stat().st_mtime_ns == first
    assert _main(capfd, "export", str(run), "--to", "torch", str(target), "--overwrite")[0] == 0
    hf = tmp_path / "hf"
    assert _main(capfd, "export", str(run), str(hf))[0] == 0
    status, err = _main(capfd, "export", str(run), str(hf))
    assert status == 2 and "exists and is not empty; pass --overwrite" in err
    assert _main(capfd, "export", str(run), str(hf), "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.pt"]  # no leftovers beside them
    status, err = _main(capfd, "export", str(run), "--to", "hf", str(target))
    assert status == 2 and "is a file; pass a folder path" in err


def test_export_on_a_full_disk_leaves_nothing(run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import bigtrain.export as export

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_safetensors", full)
    status, err = _main(capfd, "export", str(run), str(tmp_path / "hf"))
    assert status == 2 and "No space left on device" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial sibling
