"""Every CLI verb with bad arguments: exit status 2, a message that says what is wrong, no traceback
(issue: hardening §6). In-process through ``bigtrain.cli.main``; argparse usage errors exit 2 as well."""
from __future__ import annotations

from pathlib import Path

import pytest

from bigtrain import cli

MISSING = "/nonexistent/bigtrain-test"


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    not_yaml = tmp / "notes.txt"
    not_yaml.write_text("train: [\n")
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    return [
        (["train", MISSING + ".yaml"], "does not exist"),
        (["train", str(not_yaml)], "is not valid YAML"),
        (["train", "configs/debug.yaml", "train.lr"], "is not of the form key.path=value"),
        (["config", "show", "configs/debug.yaml", "train.nope=1"], "train.nope: unknown key"),
        (["config", "check", "--world-size", "-3", "configs/debug.yaml"], "--world-size must be >= 1"),
        (["config", "docs", "extra"], "unrecognized arguments"),
        (["data", "prepare", MISSING, "--tokenizer", "data/demo/tokenizer.json", "--out", str(tmp / "o")], MISSING),
        (["data", "inspect", MISSING], MISSING),
        (["data", "tokenizer", "train", MISSING, "--vocab-size", "300", "--out", str(tmp / "t.json")], MISSING),
        (["data", "demo", "--vocab-size", "nope"], "invalid int value"),
        (["generate", str(empty)], "holds no committed checkpoint"),
        (["generate", str(empty), "--top-k", "-5"], "--top-k must be >= 0"),
        (["export", str(empty), str(tmp / "out")], "holds no committed checkpoint"),
        (["export", MISSING, "--to", "onnx", str(tmp / "out")], "invalid choice: 'onnx'"),
        (["ckpt", "ls", MISSING], "does not exist"),
        (["ckpt", "verify", MISSING], "does not exist"),
        (["plan", "configs/debug.yaml", "--world-size", "0"], "--world-size must be >= 1"),
        (["plan", "configs/debug.yaml", "--world-size", "1", "--gpu-memory-gib", "-1"],
         "--gpu-memory-gib must be positive"),
        (["doctor", MISSING + ".yaml"], "does not exist"),
        (["plot", MISSING], MISSING),
        (["runs", MISSING], MISSING),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]


def test_every_verb_refuses_bad_input_with_exit_2_and_a_message(tmp_path: Path, demo_data: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    failures = []
    verbs_seen = set()
    for argv, words in _cases(tmp_path):
        verbs_seen.add(argv[0])
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse usage errors
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capfd.readouterr()
        text = out + err
        if status != 2 or words not in text or "Traceback" in text:
            failures.append(f"{argv}: exit {status}, wanted 2 and {words!r}; output: {text.strip()[:300]!r}")
    assert not failures, "\n".join(failures)
    every_verb = {"train", "config", "data", "generate", "export", "ckpt", "plan", "doctor", "plot", "runs"}
    assert every_verb <= verbs_seen
