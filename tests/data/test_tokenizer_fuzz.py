"""The tokenizer file is hostile input too (issue: hardening II, "beyond the list"): every malformed
`data.tokenizer` stops a run with one line naming the file, exit 2, no traceback, no run folder, no hang."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli

TINY = ["data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=1",
        "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "checkpoint.at_end=false",
        "run.device=cpu", "log.console=false"]

# name -> the bytes of tokenizer.json
ROWS: dict[str, bytes] = {
    "empty": b"",
    "not-json": b"{this is not json",
    "latin-1": '{"version": "1.0", "model": {"type": "BPE", "vocab": {"caf\u00e9": 0}}}'.encode("latin-1"),
    "a-list": b"[1, 2, 3]",
    "a-string": b'"tokenizer"',
    "no-model": json.dumps({"version": "1.0"}).encode(),
    "model-of-wrong-type": json.dumps({"version": "1.0", "model": [1, 2]}).encode(),
    "vocab-of-wrong-types": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": "x"},
                                                                   "merges": []}}).encode(),
    "deeply-nested": b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "binary-noise": bytes(range(256)) * 64,
}


@pytest.mark.parametrize("name", list(ROWS))
def test_a_malformed_tokenizer_is_one_line(name: str, tmp_path: Path, demo_data: Path) -> None:
    bad = tmp_path / "tok" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_bytes(ROWS[name])
    run = tmp_path / "run"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={run}", f"data.tokenizer={bad}", *TINY)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert str(bad) in lines[0], lines
    assert not run.exists()
