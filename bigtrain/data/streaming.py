"""Reading and tokenizing raw files in DataLoader worker processes.

The records of a text source, in its per-epoch file order, are cut into *blocks* of
``BLOCK_RECORDS`` consecutive records of one file, numbered ``b = 0, 1, ...`` from the start
position. Worker ``w`` of ``W`` tokenizes (one batched `tokenizers` call) exactly the blocks with
``b % W == w``; the main process puts blocks back in order of ``b``. So the token stream does
not depend on the number of workers, and no document is tokenized twice on a rank.

Each worker reads every file through Hugging Face ``datasets`` in streaming mode as Arrow tables
(cheap: no Python strings are made for other workers' blocks). Files are local; set
``HF_DATASETS_OFFLINE=1`` so nothing is looked up on the Hub. ``datasets`` is imported here
only, inside the functions that need it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

BLOCK_RECORDS = 256
"""Records per tokenization block: big enough for batched encoding, small enough for low latency."""

# Per-record codes in a block.
DOC, MISSING, EMPTY = 0, 1, 2
_SURROGATES = re.compile("[\ud800-\udfff]")


def file_order(num_files: int, seed: list[int], epoch: int, shuffle: bool) -> list[int]:
    """Order in which epoch ``epoch`` reads the files (a seeded permutation, new every epoch)."""
    if not shuffle:
        return list(range(num_files))
    return [int(i) for i in np.random.default_rng([*seed, epoch, 1]).permutation(num_files)]


def iter_file_tables(path: str, kind: str, text_field: str, skip: int, block: int) -> Iterator[Any]:
    """Arrow tables of ``block`` records of one file, starting at record ``skip``."""
    from datasets import load_dataset

    if os.path.getsize(path) == 0:
        return  # datasets cannot infer features of an empty file; it simply has no records
    if kind == "jsonl":
        # encoding "utf_8" (not "utf-8") makes the json builder decode with encoding_errors, so invalid
        # UTF-8 becomes U+FFFD instead of an exception.
        ds = load_dataset("json", data_files=[path], streaming=True, split="train", encoding="utf_8",
                          encoding_errors="replace")
    elif kind == "text":
        ds = load_dataset("text", data_files=[path], streaming=True, split="train", sample_by="document",
                          encoding_errors="replace")
    else:
        ds = load_dataset("parquet", data_files=[path], streaming=True, split="train", columns=[text_field])
    if skip:
        ds = ds.skip(skip)
    yield from ds.with_format("arrow").iter(batch_size=block)


class BlockDataset(torch.utils.data.IterableDataset):
    """Tokenized blocks of one text source from a start position, split over DataLoader workers.

    Yields dicts: ``b`` (block number), ``epoch``, ``file_pos`` (index in the epoch's file order),
    ``record`` (first record of the block in its file), ``codes`` (DOC/MISSING/EMPTY per record),
    ``lengths`` (tokens per record, EOS/BOS included), ``replaced`` (U+FFFD per record) and
    ``tokens`` (all DOC records' tokens, concatenated); or ``{"error": message}``.
    """

    def __init__(self, spec: dict[str, Any], start: tuple[int, int, int], block: int = BLOCK_RECORDS) -> None:
        super().__init__()
        self.spec, self.start, self.block = spec, start, block

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        files, max_epochs = spec["files"], spec["max_epochs"]
        tok = None
        epoch, fpos, rec = self.start
        b = 0
        while not max_epochs or epoch < max_epochs:
            full_epoch = fpos == 0 and rec == 0
            seen = 0
            order = file_order(len(files), spec["seed"], epoch, spec["shuffle"])
            for pos in range(fpos, len(order)):
                path = files[order[pos]]
                try:
                    tables = iter_file_tables(path, spec["kind"], spec["text_field"], rec, self.block)
                    first = rec
                    for table in tables:
                        seen += len(table)
                        if b % nw == wid:
                            if tok is None:
                                tok = _make_tokenizer(spec)
                            yield {"b": b, "epoch": epoch, "file_pos": pos, "record": first,
                                   **_encode(table, spec, tok)}
                        b += 1
                        first += len(table)
                except Exception as e:  # reported by the main process as a UserError naming the file
                    yield {"error": f"source {spec['name']!r}: cannot read {path} as {spec['kind']} "
                                    f"(after record {rec}): {type(e).__name__}: {e}"}
                    return
                rec = 0
            if full_epoch and seen == 0:
                return  # no records at all: the main process reports an empty source
            epoch, fpos = epoch + 1, 0


def _make_tokenizer(spec: dict[str, Any]) -> Any:
    """A fresh tokenizer in this process (never share a Rust tokenizer across fork)."""
    from tokenizers import Tokenizer as HFTokenizer

    from bigtrain.data.tokenizer import Tokenizer

    return Tokenizer(HFTokenizer.from_str(spec["tokenizer_json"]), eos_token=spec["eos_token"])


def _encode(table: Any, spec: dict[str, Any], tok: Any) -> dict[str, Any]:
    """Tokenize one block: documents get BOS/EOS as configured; missing/empty records are coded."""
    field = spec["text_field"]
    n = len(table)
    values = table.column(field).to_pylist() if field in table.column_names else [None] * n
    codes = np.zeros(n, dtype=np.int8)
    replaced = np.zeros(n, dtype=np.int32)
    texts: list[str] = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            codes[i] = MISSING
        elif not v.strip():
            codes[i] = EMPTY
        else:
            if "\ufffd" in v:
                replaced[i] = v.count("\ufffd")
            if _SURROGATES.search(v):  # lone surrogates from JSON "\ud800" escapes cannot be encoded
                replaced[i] += len(_SURROGATES.findall(v))
                v = _SURROGATES.sub("\ufffd", v)
            texts.append(v)
    ids = tok.encode_batch(texts) if texts else []
    bos, eos = spec["bos_id"], spec["eos_id"]
    extra = (bos is not None) + (eos is not None)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[codes == DOC] = [len(x) + extra for x in ids]
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    at = 0
    for x in ids:
        if bos is not None:
            tokens[at] = bos
            at += 1
        tokens[at: at + len(x)] = x
        at += len(x)
        if eos is not None:
            tokens[at] = eos
            at += 1
    return {"codes": codes, "lengths": lengths, "replaced": replaced, "tokens": tokens}


def identity(x: Any) -> Any:
    """DataLoader collate_fn: blocks are already what the packer wants (no tensor conversion)."""
    return x


def block_stream(spec: dict[str, Any], start: tuple[int, int, int], num_workers: int) -> Iterator[dict[str, Any]]:
    """Blocks in order of ``b`` from ``start``, tokenized by ``num_workers`` worker processes."""
    ds = BlockDataset(spec, start)
    if num_workers == 0:
        yield from ds
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=identity,
                                         prefetch_factor=4)
    pending: dict[int, dict[str, Any]] = {}
    want = 0
    it = iter(loader)
    try:
        for item in it:
            if "error" in item:
                yield item
                return
            pending[item["b"]] = item
            while want in pending:  # the loader round-robins workers, but never rely on it
                yield pending.pop(want)
                want += 1
        while want in pending:
            yield pending.pop(want)
            want += 1
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def describe_path(spec: dict[str, Any], epoch: int, file_pos: int) -> str:
    """The file at ``file_pos`` of epoch ``epoch`` (for messages)."""
    order = file_order(len(spec["files"]), spec["seed"], epoch, spec["shuffle"])
    return str(Path(spec["files"][order[file_pos]]))
