"""Training sources: memory-mapped token shards and streamed raw text (text / jsonl / parquet).

Every source turns into an endless (or ``max_epochs``-capped) sequence of training samples of
``seq_len + 1`` tokens, addressed by the source-local sample index ``j``:

* :class:`ShardSource` has random access: sample ``j`` is window ``perm_e[j % W]`` of epoch
  ``e = j // W``, where ``W`` windows of ``seq_len + 1`` tokens (stride ``seq_len``) tile the
  concatenated shards and ``perm_e`` is a seeded permutation. Its state is just ``j``.
* :class:`TextSource` reads files in a seeded per-epoch order with the raw-document reader of
  :mod:`bigtrain.data.documents` (the one `bigtrain data prepare` uses), tokenizes documents in
  DataLoader worker processes (:mod:`bigtrain.data.streaming`) and packs them
  (:class:`~bigtrain.data.packing.Packer`):
  sample ``j`` is tokens ``[j*L, j*L + L + 1)`` of the documents concatenated, each followed
  by EOS. It must be read in order, so its state is the reading position (epoch, file, record,
  token offset) — enough to resume mid-document without replaying anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bigtrain.data.batches import TokenStream
from bigtrain.data.config import SourceConfig
from bigtrain.data.documents import check_parquet_column, find_files, format_of, read_records
from bigtrain.data.packing import Packer
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError


class Source(Protocol):
    """What the mixer needs from a source."""

    name: str
    kind: str
    weight: float

    def take(self, j: int, out: np.ndarray | None) -> bool:
        """Write sample ``j`` (``seq_len + 1`` tokens) into ``out`` (skip it if None), or raise Exhausted."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able reading position (beyond the sample count, which the pipeline keeps)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (the pipeline restores the sample count itself)."""

    def progress(self, count: int) -> float:
        """Epochs done after ``count`` samples (fractional where known)."""

    def stats(self) -> dict[str, int]:
        """Per-source counters for the training log."""

    def close(self) -> None:
        """Release worker processes / files."""


class Exhausted(Exception):
    """A source reached its ``max_epochs`` cap (the mixer drops it and renormalizes the weights)."""


class ShardSource:
    """Prepared token shards, memory-mapped; random access by sample index."""

    kind = "shards"

    def __init__(self, cfg: SourceConfig, name: str, index: int, *, seq_len: int, vocab_size: int,
                 fingerprint: str | None, seed: int, shuffle: bool) -> None:
        self.name, self.weight, self.index, self.max_epochs = name, cfg.weight, index, cfg.max_epochs
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.stream = TokenStream.open(cfg.paths, vocab_size=vocab_size, tokenizer_fingerprint=fingerprint,
                                       what=f"source {name!r}")
        self.num_windows = (self.stream.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(
                f"source {name!r} has {self.stream.num_tokens} tokens, fewer than one sequence of "
                f"data.seq_len={seq_len} + 1; use more data or a shorter data.seq_len."
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return self.stream.num_tokens

    def window(self, j: int) -> int:
        """Window index of source-local sample ``j``."""
        epoch, i = divmod(j, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            # Source 0 keeps the seed layout of the single-source loader, so old runs replay exactly.
            key = [self.seed, epoch] if self.index == 0 else [self.seed, epoch, self.index]
            self._perm, self._perm_epoch = np.random.default_rng(key).permutation(self.num_windows), epoch
        assert self._perm is not None
        return int(self._perm[i])

    def take(self, j: int, out: np.ndarray | None) -> bool:
        if self.max_epochs and j >= self.max_epochs * self.num_windows:
            raise Exhausted(self.name)
        if out is not None:
            self.stream.read(self.window(j) * self.seq_len, self.seq_len + 1, out)
        return True

    def limit(self) -> int | None:
        """Samples this source can give in all (None = unlimited)."""
        return self.max_epochs * self.num_windows if self.max_epochs else None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # random access: the sample count is the whole position

    def progress(self, count: int) -> float:
        return count / self.num_windows

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def resolve_files(specs: list[str], kind: str, name: str) -> list[Path]:
    """Files of a text source of ``kind``: each spec a file, a directory (recursive) or a glob; UserError if none."""
    return find_files(specs, formats=[kind], owner=f"source {name!r}", option="data.sources[].paths")


class TextSource:
    """Raw text / jsonl / parquet files streamed and tokenized on the fly; sequential access."""

    def __init__(self, cfg: SourceConfig, name: str, index: int, *, tokenizer: Tokenizer, seq_len: int,
                 seed: int, shuffle: bool, add_bos: bool, add_eos: bool, num_workers: int,
                 max_bad_fraction: float) -> None:
        self.kind: str = cfg.kind
        self.name, self.weight = name, cfg.weight
        self.files = resolve_files(cfg.paths, cfg.kind, name)
        # Parquet has a schema: a missing text column is a config mistake, found before training.
        for f in self.files:
            if format_of(f) == "parquet":
                check_parquet_column(f, cfg.text_field, f"Set data.sources[].text_field of source {name!r}.")
            # Every file opens and its first records decode now, before the run folder exists: a broken
            # file (bad gzip, a malformed JSON line) would otherwise stop the run mid-epoch.
            for _ in read_records(f, cfg.text_field):
                break
        if add_bos and tokenizer.bos_id is None:
            raise UserError("data.add_bos is true but the tokenizer has no BOS token; set data.add_bos: false.")
        spec = {
            "name": name, "kind": cfg.kind, "files": [str(f) for f in self.files], "text_field": cfg.text_field,
            "tokenizer_json": tokenizer.backend.to_str(), "eos_token": tokenizer.eos_token,
            "bos_id": tokenizer.bos_id if add_bos else None, "eos_id": tokenizer.eos_id if add_eos else None,
            "seed": [seed, index], "shuffle": shuffle, "max_epochs": cfg.max_epochs,
        }
        self.packer = Packer(spec, seq_len=seq_len, num_workers=num_workers, max_bad_fraction=max_bad_fraction)

    def take(self, j: int, out: np.ndarray | None) -> bool:
        sample = self.packer.next_sample()
        if sample is None:
            raise Exhausted(self.name)
        if out is not None:
            out[:] = sample
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_files": len(self.files), **self.packer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_files", len(self.files)) != len(self.files):
            raise UserError(f"source {self.name!r} had {state['num_files']} files when the checkpoint was saved "
                            f"and has {len(self.files)} now; the reading position cannot be restored. Restore the "
                            f"files or give the changed source a new name.")
        self.packer.load_state_dict(state)

    def progress(self, count: int) -> float:
        return self.packer.progress()

    def stats(self) -> dict[str, int]:
        return self.packer.stats()

    def close(self) -> None:
        self.packer.close()
