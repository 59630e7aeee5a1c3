"""`bigtrain data prepare` / `data tokenizer train` with bad inputs and interrupted builds (issue: hardening
§4 and §6): messages instead of tracebacks, and no output read back as input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain import cli


def _main(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return status, out + err


def _corpus(root: Path) -> Path:
    raw = root / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"doc{i}.txt").write_text(f"To be, or not to be, that is the question {i}.\n" * 20)
    return raw


def _prepare(demo_data: Path, *args: str) -> list[str]:
    return ["data", "prepare", *args, "--tokenizer", str(demo_data / "tokenizer.json"), "--num-workers", "1"]


def test_a_gz_that_is_not_gzip_is_named(tmp_path: Path, demo_data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    (raw / "broken.txt.gz").write_bytes(b"this was never compressed")
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(tmp_path / "out")))
    assert status == 2 and "broken.txt.gz: cannot be decompressed" in text and "not a complete gzip file" in text


def test_an_output_inside_an_input_folder_is_never_read_back(tmp_path: Path, demo_data: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    out = raw / "prepared"  # manifest.json and tokenizer.json there would look like jsonl inputs
    assert _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(out)))[0] == 0
    first = json.loads((out / "manifest.json").read_text())
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(out), "--overwrite"))
    assert status == 0, text
    again = json.loads((out / "manifest.json").read_text())
    assert again["splits"] == first["splits"]  # the same six documents, not the previous output as well


def test_an_existing_output_names_the_flag_that_replaces_it(tmp_path: Path, demo_data: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(tmp_path / "out")))
    assert status == 2 and "already exists and is not empty" in text and "--overwrite" in text


def test_a_binary_file_is_named_in_a_warning(tmp_path: Path, demo_data: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    (raw / "image.txt").write_bytes(bytes(range(256)) * 40)
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(tmp_path / "out")))
    assert status == 0, text
    assert "image.txt looks like a binary file" in text and "NUL bytes" in text
    assert "doc0.txt looks like" not in text


def test_an_interrupted_tokenizer_training_restarts_without_blaming_the_inputs(
        tmp_path: Path, demo_data: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    (tmp_path / "out.partial").mkdir()  # what a build killed while training its tokenizer leaves
    status, text = _main(capfd, "data", "prepare", str(raw), "--out-dir", str(tmp_path / "out"), "--vocab-size", "300",
                         "--num-workers", "1")
    assert status == 0, text
    assert "restarting the interrupted build" in text and "other inputs or options" not in text


def test_tokenizer_train_into_an_unwritable_place(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, text = _main(capfd, "data", "tokenizer", "train", str(raw), "--vocab-size", "300", "--out",
                         str(blocker / "tokenizer.json"))
    assert status == 2 and "cannot write" in text and str(blocker) in text


def test_a_full_disk_while_writing_shards_is_a_message_and_the_build_resumes(
        tmp_path: Path, demo_data: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the second shard: exit 1 with one paragraph, nothing published at OUT, and the same command
    finishes the build afterwards with the same result as a build that never failed."""
    import errno

    from bigtrain.data import prepare

    raw = _corpus(tmp_path)
    args = ["--shard-tokens", "200"]
    assert _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(tmp_path / "clean"), *args))[0] == 0
    real_write, calls = prepare.write_shard, []

    def full_disk(path: Path, *a: object, **k: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, *a, **k)

    monkeypatch.setattr(prepare, "write_shard", full_disk)
    out = tmp_path / "out"
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(out), *args))
    assert status == 1, text
    assert "data prepare stopped: No space left on device" in text and "run the same command again" in text, text
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(prepare, "write_shard", real_write)
    status, text = _main(capfd, *_prepare(demo_data, str(raw), "--out-dir", str(out), *args))
    assert status == 0, text
    want = json.loads((tmp_path / "clean" / "manifest.json").read_text())["splits"]
    assert json.loads((out / "manifest.json").read_text())["splits"] == want
    for split in want.values():
        for shard in split["shards"]:
            assert (out / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes(), shard
