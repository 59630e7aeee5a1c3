"""Packing: documents (each followed by EOS) concatenated into fixed ``seq_len + 1`` windows.

Sample ``j`` of a text source is tokens ``[j*L, j*L + L + 1)`` of its token stream (``L`` =
seq_len): consecutive samples overlap by the one token that is the last target of one row and
the first input of the next, so every token is predicted exactly once and no token is split
or dropped (except the final ``< L + 1`` tokens of a capped source). The same layout as the
windows of token shards.

:class:`Packer` keeps the reading position as (epoch, file_pos, record, offset): the record the
next sample starts in and the token offset inside it. That position is the source's state, so
a run resumes mid-document by re-reading one record, without replaying anything before it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from bigtrain.data.streaming import DOC, EMPTY, MISSING, block_stream, describe_path
from bigtrain.errors import UserError

_CHECK_BAD_AFTER = 100  # records seen before max_bad_fraction is enforced (a few bad lines are noise)
_COUNTERS = ("records", "docs", "missing_field", "empty", "invalid_utf8")


class Packer:
    """Pack one text source's documents into training samples, in order, resumably."""

    def __init__(self, spec: dict[str, Any], *, seq_len: int, num_workers: int, max_bad_fraction: float) -> None:
        self.spec, self.seq_len, self.num_workers = spec, seq_len, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.pos = (0, 0, 0)  # (epoch, file_pos, record) of the head record when the buffer is empty
        self.offset = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._close_stream()
        # Buffered records: [epoch, file_pos, record, code, tokens, replaced]; head = current record.
        self._records: deque[tuple[int, int, int, int, np.ndarray, int]] = deque()
        self._avail = 0  # buffered tokens from the current position on
        self._stream: Iterator[dict[str, Any]] | None = None
        self._epoch_docs: dict[int, int] = {}
        self._start_epoch = self.pos[0] if self.pos[1:] == (0, 0) else self.pos[0] + 1

    # ------------------------------------------------------------------ reading
    def _fetch(self) -> bool:
        """Append the next block's records to the buffer; False at the end of the stream."""
        if self._stream is None:
            self._stream = block_stream(self.spec, self.pos if not self._records else self._records[-1][:3],
                                        self.num_workers)
        item = next(self._stream, None)
        if item is None:
            return False
        if "error" in item:
            raise UserError(item["error"] + ". Fix or remove the file.")
        epoch, fpos, first = item["epoch"], item["file_pos"], item["record"]
        if epoch - 1 >= self._start_epoch and self._epoch_docs.get(epoch - 1, 0) == 0:
            self._raise_empty()
        at = 0
        tokens = item["tokens"]
        for i, (code, n, rep) in enumerate(zip(item["codes"], item["lengths"], item["replaced"], strict=True)):
            self._records.append((epoch, fpos, first + i, int(code), tokens[at: at + n], int(rep)))
            at += n
        self._epoch_docs[epoch] = self._epoch_docs.get(epoch, 0) + int((item["codes"] == DOC).sum())
        self._avail += int(item["lengths"].sum())
        return True

    def _raise_empty(self) -> None:
        c = self.counters
        raise UserError(
            f"source {self.spec['name']!r} yields no documents ({len(self.spec['files'])} file(s); so far "
            f"{c['missing_field']} records without field {self.spec['text_field']!r}, {c['empty']} empty). "
            f"Check data.sources[].paths and text_field, or remove the empty source."
        )

    def next_sample(self) -> np.ndarray | None:
        """The next ``seq_len + 1`` tokens (advancing by seq_len), or None when the source is used up."""
        need = self.seq_len + 1
        while self._avail < need:
            if not self._fetch():
                if not self.spec["max_epochs"] or (self.counters["docs"] == 0 and not sum(self._epoch_docs.values())):
                    self._raise_empty()
                return None
        out = np.empty(need, dtype=np.int64)
        filled, off = 0, self.offset
        for rec in self._records:
            take = min(need - filled, len(rec[4]) - off)
            out[filled: filled + take] = rec[4][off: off + take]
            filled += take
            off = 0
            if filled == need:
                break
        self._advance(self.seq_len)
        return out

    def _advance(self, n: int) -> None:
        """Consume ``n`` tokens; records left behind are counted (and bad ones checked)."""
        self._avail -= n
        n += self.offset
        while self._records and n >= len(self._records[0][4]):
            n -= len(self._records[0][4])
            self._leave(self._records.popleft())
        self.offset = n

    def _leave(self, rec: tuple[int, int, int, int, np.ndarray, int]) -> None:
        epoch, fpos, record, code, _, replaced = rec
        self.pos = (epoch, fpos, record + 1)
        c = self.counters
        c["records"] += 1
        c["invalid_utf8"] += replaced
        if code == DOC:
            c["docs"] += 1
        elif code == EMPTY:
            c["empty"] += 1
        elif code == MISSING:
            c["missing_field"] += 1
            if c["records"] >= _CHECK_BAD_AFTER and c["missing_field"] > self.max_bad_fraction * c["records"]:
                raise UserError(
                    f"source {self.spec['name']!r}: {c['missing_field']} of {c['records']} records have no "
                    f"{self.spec['text_field']!r} text field (latest: {describe_path(self.spec, epoch, fpos)} "
                    f"record {record}), more than data.max_bad_fraction={self.max_bad_fraction}. Set "
                    f"data.sources[].text_field to the field that holds the text, or clean the files."
                )

    # ------------------------------------------------------------------ state
    def position(self) -> tuple[int, int, int, int]:
        """(epoch, file_pos, record, offset) of the next unconsumed token."""
        if self._records:
            head = self._records[0]
            return head[0], head[1], head[2], self.offset
        return (*self.pos, self.offset)

    def state_dict(self) -> dict[str, Any]:
        epoch, fpos, record, offset = self.position()
        return {"epoch": epoch, "file_pos": fpos, "record": record, "offset": offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (counters are read from the same dict when present)."""
        self.pos = (int(state["epoch"]), int(state["file_pos"]), int(state["record"]))
        self.offset = int(state["offset"])
        self.counters = {k: int(state.get(k, 0)) for k in _COUNTERS}
        self._reset_buffer()
        # The head record is re-read; `offset` of its tokens were consumed before the checkpoint.
        self._avail = -self.offset

    def progress(self) -> float:
        epoch, fpos, _, _ = self.position()
        return epoch + fpos / len(self.spec["files"])

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def _close_stream(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None and hasattr(stream, "close"):
            stream.close()  # runs block_stream's finally: shuts the worker processes down
        self._stream = None

    def close(self) -> None:
        self._close_stream()


def document_ids(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token document index and position within the document, for rows of packed tokens.

    A new document starts after every EOS; the first token of a row starts document 0 at
    position 0 (a document continuing from the previous row restarts its positions).
    """
    rows, length = inputs.shape
    starts = np.zeros((rows, length), dtype=bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id
    doc = np.cumsum(starts, axis=1, dtype=np.int32)
    idx = np.arange(length, dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return doc, (idx - last_start).astype(np.int32)
