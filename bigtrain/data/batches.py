"""Token shards as one stream (:class:`TokenStream`), the :class:`Batch` type, and validation batches.

Training batches come from :class:`bigtrain.data.pipeline.DataPipeline`, which reads shard
sources through :class:`TokenStream`; validation uses :func:`eval_batches` on the val shards.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigtrain.data.shards import Shard, list_shards, validate_tokens
from bigtrain.errors import UserError


class TokenStream:
    """Several shards seen as one token array, with random-access window reads."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards:
            raise UserError("no token shards given")
        self.shards = list(shards)
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.offsets[-1])

    @classmethod
    def open(cls, path: str | Sequence[str], *, vocab_size: int, tokenizer_fingerprint: str | None,
             what: str) -> TokenStream:
        """Open and check every shard under ``path`` (dir, file or glob, or a list of them)."""
        specs = [path] if isinstance(path, str) else list(path)
        files: list[Path] = []
        for spec in specs:
            files += [f for f in list_shards(spec) if f not in files]
        shards = [Shard(p) for p in files]
        for shard in shards:
            if tokenizer_fingerprint and shard.tokenizer_fingerprint != tokenizer_fingerprint:
                raise UserError(
                    f"{what} shard {shard.path} was written with tokenizer {shard.tokenizer_fingerprint}, but the "
                    f"configured data.tokenizer has fingerprint {tokenizer_fingerprint}. Point data.tokenizer at the "
                    f"tokenizer.json that prepared these shards, or re-run `bigtrain data prepare`."
                )
            if shard.vocab_size > vocab_size:
                validate_tokens(shard, vocab_size)
        stream = cls(shards)
        if stream.num_tokens == 0:
            raise UserError(f"{what} data at {path!r} holds no tokens (empty source); prepare a non-empty corpus.")
        return stream

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream (may span shards), into ``out`` if given."""
        if out is None:
            out = np.empty(length, dtype=np.int64)
        idx = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pos = start - int(self.offsets[idx])
        if pos + length <= self.shards[idx].num_tokens:  # the common case: one slice, one conversion
            out[:] = self.shards[idx].tokens[pos: pos + length]
            return out
        filled = 0
        while filled < length:
            shard = self.shards[idx]
            take = min(length - filled, shard.num_tokens - pos)
            out[filled: filled + take] = shard.tokens[pos: pos + take]
            filled += take
            idx, pos = idx + 1, 0
        return out


@dataclass
class Batch:
    """One micro-batch. The id fields are set only with data.document_ids (else None)."""

    inputs: torch.Tensor   # [micro_batch, seq_len] int64
    targets: torch.Tensor  # [micro_batch, seq_len] int64 (inputs shifted by one)
    doc_ids: torch.Tensor | None = None       # [micro_batch, seq_len] int32: document index within the row
    position_ids: torch.Tensor | None = None  # [micro_batch, seq_len] int32: position within the document

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory, so `.to(cuda, non_blocking=True)` overlaps compute."""
        return Batch(self.inputs.pin_memory(), self.targets.pin_memory(),
                     self.doc_ids.pin_memory() if self.doc_ids is not None else None,
                     self.position_ids.pin_memory() if self.position_ids is not None else None)


def eval_batches(stream: TokenStream, *, seq_len: int, micro_batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Fixed, non-overlapping validation windows (the same every evaluation).

    With ``max_batches`` the windows are spread evenly over the whole split, so a partial
    evaluation still sees every held-out document rather than only the first one.
    """
    num_windows = (stream.num_tokens - 1) // seq_len
    total = num_windows // micro_batch_size
    if max_batches:  # a budget for all ranks together, rounded up so every rank gets at least one batch
        total = min(total, -(-max_batches // world_size) * world_size)
    total -= total % world_size  # every rank runs the same number of forwards (sharded models need it)
    picked = total * micro_batch_size
    windows = [i * num_windows // picked for i in range(picked)] if picked else []
    for b in range(rank, total, world_size):
        mine = windows[b * micro_batch_size: (b + 1) * micro_batch_size]
        rows = [stream.read(w * seq_len, seq_len + 1) for w in mine]
        arr = torch.from_numpy(np.stack(rows))
        yield Batch(arr[:, :-1], arr[:, 1:])
