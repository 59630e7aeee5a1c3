"""Training and validation batches cut from memory-mapped token shards.

Order is a pure function of (seed, global sample index): sample ``i`` is window
``perm_e[i % W]`` of epoch ``e = i // W``, where ``W`` windows of ``seq_len + 1`` tokens
tile the concatenated shards and ``perm_e`` is a seeded permutation. Optimizer step ``s``
consumes global samples ``[s*G, (s+1)*G)``; rank ``r`` of ``R`` takes the ``r``-th contiguous
slice. So the token stream does not depend on the world size, and the whole loader state is
one integer: the next global sample index.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    def open(cls, path: str, *, vocab_size: int, tokenizer_fingerprint: str | None, what: str) -> "TokenStream":
        """Open and check every shard under ``path`` (dir, file or glob)."""
        shards = [Shard(p) for p in list_shards(path)]
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
            raise UserError(f"{what} data at {path!r} holds no tokens; prepare a non-empty corpus.")
        return stream

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream (may span shards)."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        idx = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pos = start - int(self.offsets[idx])
        while filled < length:
            shard = self.shards[idx]
            take = min(length - filled, shard.num_tokens - pos)
            out[filled: filled + take] = shard.tokens[pos: pos + take]
            filled += take
            idx, pos = idx + 1, 0
        return out


@dataclass
class Batch:
    inputs: torch.Tensor   # [micro_batch, seq_len] int64
    targets: torch.Tensor  # [micro_batch, seq_len] int64 (inputs shifted by one)


class TrainLoader:
    """Deterministic, resumable training batches for one rank (Stateful: state_dict/load_state_dict)."""

    def __init__(self, stream: TokenStream, *, seq_len: int, micro_batch_size: int, global_batch_seqs: int,
                 rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        self.stream, self.seq_len, self.micro = stream, seq_len, micro_batch_size
        self.global_batch_seqs, self.rank, self.world_size = global_batch_seqs, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_windows = (stream.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(
                f"training data has {stream.num_tokens} tokens, fewer than one sequence of data.seq_len={seq_len} + 1; "
                f"use more data or a shorter data.seq_len."
            )
        self.per_rank = global_batch_seqs // world_size
        self.next_sample = 0  # global index of the first sample of the next step
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> float:
        return self.next_sample / self.num_windows

    def _window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        assert self._perm is not None
        return int(self._perm[i])

    def _batch(self, samples: range) -> Batch:
        rows = [self.stream.read(self._window(s) * self.seq_len, self.seq_len + 1) for s in samples]
        arr = torch.from_numpy(np.stack(rows))
        return Batch(arr[:, :-1], arr[:, 1:])

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        first = self.next_sample + self.rank * self.per_rank
        batches = [self._batch(range(first + m, first + m + self.micro)) for m in range(0, self.per_rank, self.micro)]
        self.next_sample += self.global_batch_seqs
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self.next_sample, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_sample = int(state["next_sample"])


def eval_batches(stream: TokenStream, *, seq_len: int, micro_batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Fixed, non-overlapping validation windows (the same every evaluation).

    With ``max_batches`` the windows are spread evenly over the whole split, so a partial
    evaluation still sees every held-out document rather than only the first one.
    """
    num_windows = (stream.num_tokens - 1) // seq_len
    total = num_windows // micro_batch_size
    if max_batches:
        total = min(total, max_batches)
    total -= total % world_size  # every rank runs the same number of forwards (sharded models need it)
    picked = total * micro_batch_size
    windows = [i * num_windows // picked for i in range(picked)] if picked else []
    for b in range(rank, total, world_size):
        rows = [stream.read(w * seq_len, seq_len + 1) for w in windows[b * micro_batch_size: (b + 1) * micro_batch_size]]
        arr = torch.from_numpy(np.stack(rows))
        yield Batch(arr[:, :-1], arr[:, 1:])


def resolve_path(path: str) -> str:
    """Expand ~ so messages and globbing see the real path."""
    return str(Path(path).expanduser())
