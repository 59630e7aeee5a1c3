"""Token shard format: round trips, header, alignment, corruption detection, listing."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from bigtrain.data.shards import DATA_ALIGN, MAGIC, Shard, list_shards, validate_tokens, write_shard
from bigtrain.errors import UserError

META = {"num_docs": 3, "num_bytes": 1234, "eos_id": 0, "tokenizer_fingerprint": "0123456789abcdef"}


def make(path: Path, tokens: np.ndarray, vocab_size: int = 1000, **kw: object) -> Path:
    write_shard(path, tokens, vocab_size=vocab_size, **{**META, **kw})
    return path


@pytest.mark.parametrize(
    "vocab_size,dtype,top",
    [(1000, "uint16", 999), (65536, "uint16", 65535), (65537, "uint32", 65536), (200_000, "uint32", 199_999)],
)
def test_round_trip(tmp_path: Path, vocab_size: int, dtype: str, top: int) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=10_001)
    tokens[7] = top
    path = make(tmp_path / "s.bin", tokens, vocab_size=vocab_size, source="unit test")
    shard = Shard(path)
    assert shard.header["dtype"] == dtype and shard.tokens.dtype == np.dtype(dtype)
    assert isinstance(shard.tokens, np.memmap) and not shard.tokens.flags.writeable
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert (shard.num_tokens, shard.num_docs, shard.num_bytes) == (10_001, 3, 1234)
    assert (shard.vocab_size, shard.eos_id, shard.tokenizer_fingerprint) == (vocab_size, 0, "0123456789abcdef")
    assert shard.header["version"] == 1 and shard.header["source"] == "unit test"
    assert shard.header["created_by"].startswith("bigtrain ")
    assert len(shard) == 10_001
    assert not path.with_name("s.bin.tmp").exists()


def test_layout_on_disk(tmp_path: Path) -> None:
    """The documented byte layout, read without bigtrain's reader."""
    tokens = np.arange(100, dtype=np.int64)
    raw = make(tmp_path / "s.bin", tokens).read_bytes()
    assert raw[:8] == MAGIC
    version, hlen = struct.unpack("<II", raw[8:16])
    header = json.loads(raw[16 : 16 + hlen].decode("utf-8"))
    assert version == 1 and header["num_tokens"] == 100 and "source" not in header
    offset = Shard(tmp_path / "s.bin").data_offset
    assert offset % DATA_ALIGN == 0 and offset >= 16 + hlen and offset - (16 + hlen) < DATA_ALIGN
    assert set(raw[16 + hlen : offset]) <= {0}
    assert len(raw) == offset + 200
    np.testing.assert_array_equal(np.frombuffer(raw[offset:], dtype="<u2"), tokens)


def test_empty_shard(tmp_path: Path) -> None:
    shard = Shard(make(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), num_docs=0, num_bytes=0))
    assert shard.num_tokens == 0 and len(shard.tokens) == 0


def test_write_rejects_out_of_range_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token ids"):
        make(tmp_path / "s.bin", np.array([1, 1000]))
    with pytest.raises(ValueError, match="token ids"):
        make(tmp_path / "s.bin", np.array([-1, 3]))
    assert not list(tmp_path.iterdir())


def test_truncated(tmp_path: Path) -> None:
    path = make(tmp_path / "s.bin", np.arange(500))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"s\.bin is truncated"):
        Shard(path)
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(UserError, match=r"s\.bin"):
        Shard(path)


def test_bad_magic(tmp_path: Path) -> None:
    path = make(tmp_path / "s.bin", np.arange(10))
    path.write_bytes(b"NOTSHARD" + path.read_bytes()[8:])
    with pytest.raises(UserError, match="not a bigtrain token shard"):
        Shard(path)
    (tmp_path / "tiny.bin").write_bytes(b"BG")
    with pytest.raises(UserError, match=r"tiny\.bin"):
        Shard(tmp_path / "tiny.bin")


def test_unsupported_version(tmp_path: Path) -> None:
    path = make(tmp_path / "s.bin", np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 2)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="version 2"):
        Shard(path)


def test_bad_header_json(tmp_path: Path) -> None:
    path = make(tmp_path / "s.bin", np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[16] = ord("x")  # first byte of the JSON object
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt header"):
        Shard(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Shard(tmp_path / "nope.bin")


def test_validate_tokens(tmp_path: Path) -> None:
    tokens = np.arange(1000) % 300
    tokens[-1] = 700
    shard = Shard(make(tmp_path / "s.bin", tokens))
    validate_tokens(shard, 1000)
    validate_tokens(shard, 701, chunk=64)
    with pytest.raises(UserError, match=r"contains token id 700.*vocab_size is 500"):
        validate_tokens(shard, 500, chunk=64)  # the bad id sits in the last chunk


def test_list_shards(tmp_path: Path) -> None:
    d = tmp_path / "train"
    d.mkdir()
    for name in ["shard_00002.bin", "shard_00000.bin", "shard_00001.bin"]:
        make(d / name, np.arange(5))
    (d / "notes.txt").write_text("x")
    expected = [d / f"shard_0000{i}.bin" for i in range(3)]
    assert list_shards(d) == expected
    assert list_shards(str(d / "*.bin")) == expected
    assert list_shards(str(tmp_path / "**" / "*.bin")) == expected
    assert list_shards(d / "shard_00001.bin") == [d / "shard_00001.bin"]


def test_list_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="No token shards"):
        list_shards(str(tmp_path / "*.bin"))
    with pytest.raises(UserError, match="No token shards"):
        list_shards(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        list_shards(tmp_path / "missing_dir")
