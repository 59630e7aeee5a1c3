"""`prepare_corpus`: input formats, document-level train/val split, sharding, errors, atomicity."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigtrain.data.prepare import prepare_corpus
from bigtrain.data.shards import Shard, list_shards, read_manifest, verify_prepared
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.messages import capture

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def doc(i: int) -> str:
    """A distinct document (its number is spelled into it), some non-ASCII."""
    rng = random.Random(i)
    return f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + " ü."


def read_docs(out: Path, split: str) -> list[str]:
    """Decode every document (EOS-terminated) of a split."""
    tok = Tokenizer.from_file(out / "tokenizer.json")
    # Concatenate first: a document longer than shard_tokens continues in the next shard.
    tokens = np.concatenate([np.asarray(Shard(p).tokens) for p in list_shards(out / split)])
    assert tokens[-1] == tok.eos_id
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """40 docs: 20 .txt files, a .jsonl with 10, a .parquet with 10."""
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i in range(20):
        (src / "txt" / f"{i:02d}.txt").write_text(doc(i), encoding="utf-8")
    with open(src / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in range(20, 30):
            f.write(json.dumps({"id": i, "text": doc(i)}) + "\n")
        f.write("\n")  # blank lines are ignored
    pq.write_table(pa.table({"text": [doc(i) for i in range(30, 40)]}), src / "docs.parquet")
    return src


def test_prepare_mixed_inputs(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = [str(corpus / "txt"), str(corpus / "docs.jsonl"), str(corpus / "*.parquet")]
    assert prepare_corpus(inputs, out, vocab_size=300, val_fraction=0.1) == out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train", "val"]
    assert not list(tmp_path.glob("out.tmp-*"))
    m = verify_prepared(out)
    assert m["splits"]["train"]["num_docs"] == 36 and m["splits"]["val"]["num_docs"] == 4
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(doc(i) for i in range(40))
    total_bytes = sum(len(doc(i).encode()) for i in range(40))
    assert m["splits"]["train"]["num_bytes"] + m["splits"]["val"]["num_bytes"] == total_bytes
    tok = Tokenizer.from_file(out / "tokenizer.json")
    assert tok.vocab_size <= 300 and m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert Shard(out / "val" / "shard_00000.bin").tokenizer_fingerprint == tok.fingerprint


def test_split_is_deterministic_and_seeded(corpus: Path, tmp_path: Path) -> None:
    args = {"vocab_size": 300, "val_fraction": 0.2}
    prepare_corpus([str(corpus / "txt")], tmp_path / "a", seed=1, **args)
    prepare_corpus([str(corpus / "txt")], tmp_path / "b", seed=1, **args)
    prepare_corpus([str(corpus / "txt")], tmp_path / "c", seed=2, **args)
    assert read_docs(tmp_path / "a", "val") == read_docs(tmp_path / "b", "val")
    assert sorted(read_docs(tmp_path / "a", "val")) != sorted(read_docs(tmp_path / "c", "val"))
    assert (tmp_path / "a/train/shard_00000.bin").read_bytes() == (tmp_path / "b/train/shard_00000.bin").read_bytes()


def test_at_least_one_val_doc(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(doc(i))
    prepare_corpus([str(tmp_path / "*.txt")], tmp_path / "out", vocab_size=300, val_fraction=0.01)
    m = read_manifest(tmp_path / "out")
    assert (m["splits"]["train"]["num_docs"], m["splits"]["val"]["num_docs"]) == (1, 1)


def test_given_tokenizer_and_small_shards(corpus: Path, tmp_path: Path) -> None:
    Tokenizer.byte_level().save(tmp_path / "bytes.json")
    out = tmp_path / "out"
    prepare_corpus([str(corpus / "txt")], out, tokenizer=str(tmp_path / "bytes.json"), shard_tokens=300,
                   val_fraction=0.0)
    m = read_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 257 and m["splits"]["val"]["num_docs"] == 0
    shards = [Shard(p) for p in list_shards(out / "train")]
    assert len(shards) > 3 and all(s.num_tokens <= 300 for s in shards)
    assert sum(s.num_docs for s in shards) == 20
    # Byte-level ids are the bytes: every document plus its EOS, in input order.
    assert sum(s.num_tokens for s in shards) == sum(len(doc(i).encode()) + 1 for i in range(20))
    assert read_docs(out, "train") == [doc(i) for i in range(20)]


def test_oversized_document_is_split(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("x" * 1000)
    (tmp_path / "small.txt").write_text("y" * 10)
    Tokenizer.byte_level().save(tmp_path / "bytes.json")
    prepare_corpus([str(tmp_path / "*.txt")], tmp_path / "out", tokenizer=str(tmp_path / "bytes.json"),
                   shard_tokens=256, val_fraction=0.0)
    shards = [Shard(p) for p in list_shards(tmp_path / "out" / "train")]
    # 1001 tokens of big.txt fill three shards; its tail (233) and small.txt (11) share the last.
    assert [s.num_tokens for s in shards] == [256, 256, 256, 244]
    assert [s.num_docs for s in shards] == [0, 0, 0, 2]
    assert [s.num_bytes for s in shards] == [0, 0, 0, 1010]


def test_json_array_gzip_and_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"body": doc(1)}, {"body": doc(2)}, {"body": None}]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": doc(3)}) + "\n" + json.dumps({"body": "bad \ud800 surrogate"}) + "\n")
    (tmp_path / "c.txt").write_bytes(b"broken \xff\xfe utf8 and a real \xef\xbf\xbd")
    out = tmp_path / "out"
    with capture() as logs:
        prepare_corpus([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.txt")], out,
                       text_key="body", vocab_size=300)
    m = read_manifest(out)
    assert m["num_invalid_utf8"] == 3 and m["num_empty_docs_skipped"] == 1
    assert any("replaced 3 invalid UTF-8" in line for line in logs)
    docs = read_docs(out, "train") + read_docs(out, "val")
    assert "broken \ufffd\ufffd utf8 and a real \ufffd" in docs and "bad \ufffd surrogate" in docs


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.*"))


@pytest.mark.parametrize("case", ["missing_file", "empty_glob", "empty_dir", "empty_docs", "jsonl_key", "parquet_key",
                                  "bad_json", "bad_suffix", "missing_tokenizer"])
def test_user_errors_leave_nothing(tmp_path: Path, case: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("  \n ")
    (tmp_path / "k.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "data.csv").write_text("text\nhi\n")
    (tmp_path / "ok.txt").write_text("fine")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    inputs, match, kw = {
        "missing_file": ([str(tmp_path / "nope.txt")], r"nope\.txt does not exist", {}),
        "empty_glob": ([str(tmp_path / "*.jsonl.gz")], r"\*\.jsonl\.gz matches no input files", {}),
        "empty_dir": ([str(tmp_path / "empty")], "matches no input files", {}),
        "empty_docs": ([str(tmp_path / "e*.txt")], "no non-empty documents", {}),
        "jsonl_key": ([str(tmp_path / "k.jsonl")], r"k\.jsonl:1: record has no 'text' field \(its fields: content", {}),
        "parquet_key": ([str(tmp_path / "p.parquet")], r"p\.parquet has no column 'text' \(columns: body\)", {}),
        "bad_json": ([str(tmp_path / "bad.jsonl")], r"bad\.jsonl:2 is not valid JSON", {}),
        "bad_suffix": ([str(tmp_path / "data.csv")], "unsupported type", {}),
        "missing_tokenizer": ([str(tmp_path / "ok.txt")], "does not exist", {"tokenizer": str(tmp_path / "t.json")}),
    }[case]
    with pytest.raises(UserError, match=match):
        prepare_corpus(inputs, tmp_path / "out", vocab_size=300, **kw)
    _assert_nothing_written(tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="val_fraction"):
        prepare_corpus([str(tmp_path / "a.txt")], tmp_path / "out", val_fraction=1.0)
    with pytest.raises(UserError, match="at least 257"):
        prepare_corpus([str(tmp_path / "a.txt")], tmp_path / "out", vocab_size=100)
    _assert_nothing_written(tmp_path)


def test_existing_output_dir(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(doc(1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.me").write_text("user data")
    with pytest.raises(UserError, match="already exists"):
        prepare_corpus([str(tmp_path / "a.txt")], out, vocab_size=300)
    assert (out / "keep.me").exists()
    prepare_corpus([str(tmp_path / "a.txt")], out, vocab_size=300, overwrite=True)
    assert not (out / "keep.me").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard_*.bin"))}


def test_parallel_workers_write_identical_shards(corpus: Path, tmp_path: Path) -> None:
    one = prepare_corpus([str(corpus)], tmp_path / "one", vocab_size=300, shard_tokens=500, num_workers=1)
    two = prepare_corpus([str(corpus)], tmp_path / "two", vocab_size=300, shard_tokens=500, num_workers=2)
    assert len(_shard_bytes(one)) > 4 and _shard_bytes(one) == _shard_bytes(two)


def test_interrupted_prepare_resumes(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bigtrain.data.prepare as prep

    ref = prepare_corpus([str(corpus)], tmp_path / "ref", vocab_size=300, shard_tokens=400, num_workers=1)
    real, calls = prep._write_progress, []

    def killed_after_three(build: Path, progress: dict) -> None:
        real(build, progress)
        calls.append(progress)
        if len(calls) == 4:  # the initial record + three completed shards
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_progress", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(corpus)], tmp_path / "out", vocab_size=300, shard_tokens=400, num_workers=1)
    assert (tmp_path / "out.partial" / "progress.json").exists() and not (tmp_path / "out").exists()
    monkeypatch.setattr(prep, "_write_progress", real)
    with capture() as logs:
        out = prepare_corpus([str(corpus)], tmp_path / "out", vocab_size=300, shard_tokens=400, num_workers=1)
    assert any("resuming" in line for line in logs)
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert read_manifest(out)["splits"] == read_manifest(ref)["splits"]
    assert not (tmp_path / "out.partial").exists()
    # Different options never resume a build of other options.
    (corpus / "extra.txt").write_text(doc(99))
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(prep, "_write_progress", killed_after_three)
        calls.clear()
        prepare_corpus([str(corpus)], tmp_path / "o2", vocab_size=300, shard_tokens=400, num_workers=1)
    monkeypatch.setattr(prep, "_write_progress", real)
    with capture() as logs:
        prepare_corpus([str(corpus)], tmp_path / "o2", vocab_size=300, shard_tokens=401, num_workers=1)
    assert any("discarding" in line for line in logs)
