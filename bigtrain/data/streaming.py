"""Tokenizing a text source's records in DataLoader worker processes.

The records of a text source, in its per-epoch file order, are cut into *blocks* of
``BLOCK_RECORDS`` consecutive records of one file, numbered ``b = 0, 1, ...`` from the start
position. Worker ``w`` of ``W`` tokenizes (one batched `tokenizers` call) exactly the blocks with
``b % W == w``; the main process puts blocks back in order of ``b``. So the token stream does
not depend on the number of workers, and no document is tokenized twice on a rank.

Files are read by :func:`bigtrain.data.documents.read_blocks`, the reader `bigtrain data prepare`
uses too, so a streamed file decodes to the same documents as a prepared one. A worker only counts
the records of other workers' blocks; it decodes its own.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.data.documents import NoText, Record, read_blocks
from bigtrain.errors import UserError

BLOCK_RECORDS = 256
"""Records per tokenization block: big enough for batched encoding, small enough for low latency."""

# Per-record codes in a block.
DOC, MISSING, EMPTY = 0, 1, 2


def file_order(num_files: int, seed: list[int], epoch: int, shuffle: bool) -> list[int]:
    """Order in which epoch ``epoch`` reads the files (a seeded permutation, new every epoch)."""
    if not shuffle:
        return list(range(num_files))
    return [int(i) for i in np.random.default_rng([*seed, epoch, 1]).permutation(num_files)]


class BlockDataset(torch.utils.data.IterableDataset[dict[str, Any]]):
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
                    for block in read_blocks(Path(path), spec["text_field"], start=rec, size=self.block):
                        seen += len(block)
                        if b % nw == wid:
                            if tok is None:
                                tok = _make_tokenizer(spec)
                            yield {"b": b, "epoch": epoch, "file_pos": pos, "record": block.first,
                                   **_encode(block.decode(), spec, tok)}
                        b += 1
                except Exception as e:  # reported by the main process as a UserError naming the file
                    # A UserError from the reader already names the file and line; anything else gets its type.
                    detail = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e} (after record {rec})"
                    yield {"error": f"source {spec['name']!r}: cannot read {path} as {spec['kind']}: {detail}"}
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


def _encode(records: list[Record], spec: dict[str, Any], tok: Any) -> dict[str, Any]:
    """Tokenize one block: documents get BOS/EOS as configured; records without text, or blank, are coded."""
    n = len(records)
    codes = np.zeros(n, dtype=np.int8)
    replaced = np.zeros(n, dtype=np.int32)
    texts: list[str] = []
    for i, record in enumerate(records):
        if isinstance(record, NoText):
            codes[i] = MISSING
            continue
        text, replaced[i] = record.text, record.num_invalid
        if not text.strip():
            codes[i] = EMPTY
        else:
            texts.append(text)
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
