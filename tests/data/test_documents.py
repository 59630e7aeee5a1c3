"""One reader for raw documents: `data prepare`, streamed text sources and tokenizer training agree.

The same folder of .txt / .md / .md.gz / .jsonl / .jsonl.gz / .parquet files is discovered and decoded
identically by the three uses (bigtrain.data.documents is the one reader behind all of them).
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigtrain.data.config import SourceConfig
from bigtrain.data.documents import NoText, Text, find_files, format_of, read_blocks, read_records
from bigtrain.data.prepare import prepare_corpus
from bigtrain.data.shards import Shard, list_shards, read_manifest
from bigtrain.data.sources import Exhausted, TextSource, resolve_files
from bigtrain.data.tokenizer import Tokenizer, train_tokenizer_files
from bigtrain.errors import UserError
from bigtrain.messages import capture

REPO = Path(__file__).resolve().parents[2]
BYTES = Tokenizer.byte_level()  # token = UTF-8 byte: decoded streams are the documents' exact bytes

# Sorted paths group the formats (text files, then jsonl, then parquet), so the concatenation of the three
# streamed sources is the order `data prepare` reads the whole folder in.
TEXT_FILES = {
    "a.txt": b"Windows lines\r\nkept as \xc3\xa9crit\r\n",        # CRLF is not translated
    "a_sub/deep.md": b"# Heading\n\nmarkdown *is* text\n",  # found recursively; .md is text everywhere
    "b.md.gz": "compressed markdown ü\n".encode(),
    "a0.txt": b"broken \xff utf8 here",                            # one invalid byte -> U+FFFD, counted
}
JSONL_RECORDS = {
    "c.jsonl": [{"text": "first record\n"}, None, {"text": "third, after a blank line"}, {"text": None},
                {"text": "bad \ud800 surrogate"}, "a bare JSON string is a document"],
    "d.jsonl.gz": [{"text": f"gz record {i}", "id": i} for i in range(3)],
}
PARQUET_ROWS = {"e.parquet": ["parquet row 0", None, "parquet row 2 — ünïcode"]}
IGNORED = {"notes.csv": b"text\nhi\n", ".hidden.txt": b"never read", "f.json.bak": b"{}"}


def expected_documents() -> list[str]:
    """Every non-empty document of the folder, in the order all three uses read it."""
    texts = [raw.decode("utf-8", errors="replace") for _, raw in sorted(TEXT_FILES.items())]
    records = [r for _, rs in sorted(JSONL_RECORDS.items()) for r in rs if r is not None]
    jsonl = [r if isinstance(r, str) else r["text"] for r in records]
    jsonl = [t.replace("\ud800", "\ufffd") for t in jsonl if t]
    parquet = [t for rows in PARQUET_ROWS.values() for t in rows if t]
    return texts + jsonl + parquet


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, raw in {**TEXT_FILES, **IGNORED}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    for name, records in JSONL_RECORDS.items():
        # None stands for a blank line: not a record at all.
        lines = "".join("\n" if r is None else json.dumps(r) + "\n" for r in records).encode()
        (root / name).write_bytes(gzip.compress(lines) if name.endswith(".gz") else lines)
    for name, rows in PARQUET_ROWS.items():
        pq.write_table(pa.table({"text": rows}), root / name)
    return root


def prepared_documents(out: Path) -> list[str]:
    """The documents in the prepared train shards (byte-level tokens, each document followed by EOS)."""
    tokens = np.concatenate([np.asarray(Shard(p).tokens) for p in list_shards(out / "train")]).astype(np.int64)
    ends = np.flatnonzero(tokens == BYTES.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(tokens[s:e].tolist()).decode() for s, e in zip(starts, ends, strict=True)]


def streamed_documents(folder: Path, kind: str) -> tuple[list[str], dict[str, int]]:
    """The documents a text source of ``kind`` over ``folder`` trains on (one epoch, in file order), and its stats."""
    cfg = SourceConfig(kind=kind, paths=[str(folder)], max_epochs=1)  # type: ignore[arg-type]
    # seq_len 1: sample j is tokens [j, j + 2), so the samples spell out the whole token stream.
    source = TextSource(cfg, kind, 0, tokenizer=BYTES, seq_len=1, seed=0, shuffle=False, add_bos=False,
                        add_eos=True, num_workers=0, max_bad_fraction=1.0)
    out = np.empty(2, dtype=np.int64)
    tokens: list[int] = []
    try:
        for j in range(10**6):
            source.take(j, out)
            tokens[j:] = out.tolist()
    except Exhausted:
        pass
    stats = source.stats()
    source.close()
    docs, start = [], 0
    for end in np.flatnonzero(np.array(tokens) == BYTES.eos_id):
        docs.append(bytes(tokens[start:end]).decode())
        start = end + 1
    return docs, stats


def test_one_suffix_table() -> None:
    assert {name: format_of(Path(name)) for name in ["a.TXT", "b.md", "c.md.gz", "d.jsonl.gz", "e.json",
                                                       "f.parquet", "g.csv", "h.txt.bak"]} == {
        "a.TXT": "text", "b.md": "text", "c.md.gz": "text", "d.jsonl.gz": "jsonl", "e.json": "jsonl",
        "f.parquet": "parquet", "g.csv": None, "h.txt.bak": None}


def test_prepare_streaming_and_tokenizer_training_read_the_same_documents(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = expected_documents()
    assert any("\r\n" in d for d in expected) and any("\ufffd" in d for d in expected)

    BYTES.save(tmp_path / "bytes.json")
    with capture():
        out = prepare_corpus([str(folder)], tmp_path / "out", tokenizer=str(tmp_path / "bytes.json"), val_fraction=0)
    assert prepared_documents(out) == expected
    manifest = read_manifest(out)
    assert manifest["num_input_files"] == 7 and manifest["num_invalid_utf8"] == 2  # \xff and the surrogate

    streamed, invalid = [], 0
    for kind in ("text", "jsonl", "parquet"):
        docs, stats = streamed_documents(folder, kind)
        streamed += docs
        invalid += stats["invalid_utf8"]
    assert streamed == expected
    assert invalid == 2

    trained_on: list[str] = []

    def capture_texts(cls: type[Tokenizer], texts: object, vocab_size: int, **kw: object) -> Tokenizer:
        trained_on.extend(texts)  # type: ignore[call-overload]
        return Tokenizer.byte_level()

    monkeypatch.setattr(Tokenizer, "train_bpe_from_iterator", classmethod(capture_texts))
    train_tokenizer_files([str(folder)], 300, tmp_path / "tok.json")
    assert trained_on == expected


def test_discovery_is_shared(folder: Path) -> None:
    every = find_files([folder])
    assert [f.relative_to(folder).as_posix() for f in every] == [
        "a.txt", "a0.txt", "a_sub/deep.md", "b.md.gz", "c.jsonl", "d.jsonl.gz", "e.parquet"]
    by_kind = [f for kind in ("text", "jsonl", "parquet") for f in resolve_files([str(folder)], kind, "s")]
    assert by_kind == every  # a source of each kind finds exactly its part of what prepare finds
    assert find_files([folder / "*.md*", folder / "a.txt", folder / "a.txt"]) == [folder / "b.md.gz", folder / "a.txt"]


@pytest.mark.parametrize("use", ["prepare", "source", "tokenizer"])
def test_a_file_of_another_type_is_refused_by_every_use(folder: Path, tmp_path: Path, use: str) -> None:
    csv = str(folder / "notes.csv")
    with capture(), pytest.raises(UserError, match=r"notes\.csv has an unsupported type.*\.md"):
        if use == "prepare":
            prepare_corpus([csv], tmp_path / "out", vocab_size=300)
        elif use == "source":
            resolve_files([csv], "text", "s")
        else:
            train_tokenizer_files([csv], 300, tmp_path / "tok.json")
    with pytest.raises(UserError, match=r"source 'j': .*a\.txt has an unsupported type for jsonl files"):
        resolve_files([str(folder / "a.txt")], "jsonl", "j")  # a text file is not a jsonl file by another name


@pytest.mark.parametrize("fmt", ["jsonl", "json_array", "parquet"])
def test_blocks_recut_and_skip_exactly(tmp_path: Path, fmt: str) -> None:
    texts = [f"record {i}" for i in range(11)]
    if fmt == "parquet":
        path = tmp_path / "r.parquet"
        pq.write_table(pa.table({"body": texts}), path, row_group_size=3)  # blocks span row groups
    elif fmt == "jsonl":
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps({"body": t}) + "\n\n" for t in texts))
    else:
        path = tmp_path / "r.json"
        path.write_text(json.dumps([{"body": t} for t in texts]))
    assert [r.text for r in read_records(path, "body")] == texts  # type: ignore[union-attr]
    blocks = list(read_blocks(path, "body", start=3, size=4))
    assert [(b.first, len(b)) for b in blocks] == [(3, 4), (7, 4)]
    assert [r.text for b in blocks for r in b.decode()] == texts[3:]  # type: ignore[union-attr]


def test_records_without_text(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "x"}\n{"text": null}\n{"text": 5}\n[1]\n')
    records = list(read_records(path, "text"))
    assert records[0] == Text("ok")
    assert all(isinstance(r, NoText) for r in records[1:])
    assert [(r.where.rsplit("/", 1)[-1], r.is_null) for r in records[1:]] == [  # type: ignore[union-attr]
        ("m.jsonl:2", False), ("m.jsonl:3", True), ("m.jsonl:4", False), ("m.jsonl:5", False)]
    assert "has no 'text' field (its fields: body)" in records[1].problem  # type: ignore[union-attr]


def test_text_sources_need_no_optional_package(tmp_path: Path) -> None:
    """Streaming reads local files itself: with `datasets` unimportable a jsonl source still trains."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(20)))
    code = f"""
import importlib.abc, importlib.machinery, sys
class Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "datasets":
            return importlib.machinery.ModuleSpec(name, self)
    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {{module.__name__!r}}")
sys.meta_path.insert(0, Missing())
from bigtrain.data.config import DataConfig
from bigtrain.data.pipeline import DataPipeline
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.sections import parse_section
data = parse_section(DataConfig, {{"sources": [{{"kind": "jsonl", "paths": [{str(tmp_path)!r}]}}], "seq_len": 16,
                                   "num_workers": 1, "tokenizer": ""}}, "data")
tok = Tokenizer.byte_level()
p = DataPipeline.from_config(data, tokenizer=tok, vocab_size=tok.vocab_size, micro_batch_size=4,
                             global_batch_seqs=4, rank=0, world_size=1, seed=0)
print(p.next_step()[0].inputs.shape)
p.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "torch.Size([4, 16])" in proc.stdout, proc.stdout + proc.stderr
