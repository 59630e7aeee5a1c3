"""The ``data`` config section."""
from __future__ import annotations

from dataclasses import dataclass

from bigtrain.sections import ConfigError, Section, doc_field


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the token shards and tokenizer are, and how samples are cut."""

    train_path: str = doc_field("data/demo/train", "Directory, file or glob of training token shards (*.bin).")
    val_path: str = doc_field("data/demo/val", "Directory, file or glob of validation shards ('' = no validation).")
    tokenizer: str = doc_field("data/demo/tokenizer.json", "Path to the tokenizer.json the shards were written with.")
    seq_len: int = doc_field(256, "Tokens per training sequence.")
    shuffle: bool = doc_field(True, "Visit training windows in a seeded random order, reshuffled every epoch.")

    def validate(self, path: str) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"{path}.seq_len: must be positive, got {self.seq_len}.")
        if not self.train_path:
            raise ConfigError(f"{path}.train_path: must name the training shards.")
