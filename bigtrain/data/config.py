"""The ``data`` config section and its ``data.sources`` entries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.sections import ConfigError, Section, doc_field

SourceKind = Literal["shards", "text", "jsonl", "parquet"]


@dataclass(frozen=True)
class SourceConfig(Section):
    """One training source of ``data.sources``: where its documents are and how much of the mix it gets."""

    kind: SourceKind = doc_field("shards", "shards = prepared token shards (memory-mapped); text/jsonl/parquet = raw "
                                           "files read as `bigtrain data prepare` reads them and tokenized on the fly.")
    paths: list[str] = doc_field([], "Files, directories or globs (shards: *.bin; text: one document per file; "
                                     "jsonl/parquet: one document per record).")
    weight: float = doc_field(1.0, "Relative share of training sequences drawn from this source (> 0).")
    name: str = doc_field("", "Name in logs and stats ('' = derived from the kind and first path).")
    text_field: str = doc_field("text", "jsonl field / parquet column holding the document text.")
    max_epochs: int = doc_field(0, "Cap on passes over this source; once reached it leaves the mix and the other "
                                    "weights are renormalized (0 = repeat forever).")

    def validate(self, path: str) -> None:
        if not self.paths or not all(self.paths):
            raise ConfigError(f"{path}.paths: list the files, directories or globs of this source, "
                              f"e.g. paths: [data/web/train] (got {self.paths!r}).")
        if not self.weight > 0:
            raise ConfigError(f"{path}.weight: must be > 0, got {self.weight}; remove the source instead of "
                              f"giving it weight 0.")
        if self.max_epochs < 0:
            raise ConfigError(f"{path}.max_epochs: must be >= 0 (0 = no cap), got {self.max_epochs}.")
        if not self.text_field:
            raise ConfigError(f"{path}.text_field: must name the field holding the text, e.g. 'text'.")

    def display_name(self, index: int) -> str:
        """The source's name in logs: `name`, else kind + first path (unique by index)."""
        if self.name:
            return self.name
        stem = self.paths[0].rstrip("/").split("/")[-1] or self.paths[0]
        return f"{index}:{self.kind}:{stem}"


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the training data and tokenizer are, and how documents become training sequences."""

    train_path: str = doc_field("data/demo/train", "Directory, file or glob of training token shards (*.bin); "
                                                   "used only when data.sources is empty.")
    val_path: str = doc_field("data/demo/val", "Directory, file or glob of validation shards ('' = no validation).")
    tokenizer: str = doc_field("data/demo/tokenizer.json", "Path to a Hugging Face tokenizer.json (the one the "
                                                           "shards were written with); '' = byte-level fallback.")
    seq_len: int = doc_field(256, "Tokens per training sequence.")
    shuffle: bool = doc_field(True, "Visit shard windows in a seeded random order and text files in a seeded "
                                    "order, both reshuffled every epoch.")
    sources: list[SourceConfig] = doc_field([], "Training sources mixed by weight (see data.sources[] keys); "
                                                "empty = one shard source at data.train_path.")
    add_bos: bool = doc_field(False, "Text sources: put the tokenizer's BOS token before each document.")
    add_eos: bool = doc_field(True, "Text sources: put EOS after each document (shards always have it).")
    document_ids: bool = doc_field(False, "Batches also carry doc_ids and position_ids (restarting after each EOS) "
                                          "so attention can be masked per document.")
    num_workers: int = doc_field(2, "DataLoader worker processes tokenizing text sources (0 = main process).")
    prefetch_steps: int = doc_field(2, "Steps of batches prepared ahead in a background thread (pinned memory "
                                       "on CUDA); 0 = prepare each step when asked.")
    max_bad_fraction: float = doc_field(0.5, "Stop the run if more than this fraction of a text source's records "
                                             "lack the text field (checked from 100 records on).")

    def validate(self, path: str) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"{path}.seq_len: must be positive, got {self.seq_len}.")
        if not self.train_path and not self.sources:
            raise ConfigError(f"{path}.train_path: must name the training shards (or list data.sources).")
        if self.num_workers < 0 or self.prefetch_steps < 0:
            raise ConfigError(f"{path}.num_workers / prefetch_steps: must be >= 0.")
        if not 0 < self.max_bad_fraction <= 1:
            raise ConfigError(f"{path}.max_bad_fraction: must be in (0, 1], got {self.max_bad_fraction}.")
        names = [s.display_name(i) for i, s in enumerate(self.sources)]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.sources: names must be unique, got {names}.")

    def source_list(self) -> list[SourceConfig]:
        """The sources to train on: data.sources, or one shard source at data.train_path."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(kind="shards", paths=[self.train_path], weight=1.0, name="train")]
