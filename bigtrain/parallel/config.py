"""The ``parallel`` config section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.sections import Section, doc_field


@dataclass(frozen=True)
class ParallelConfig(Section):
    """How the model is distributed across processes."""

    strategy: Literal["single"] = doc_field("single", "Sharding backend: single (one process; ddp, fsdp and zero arrive with the sharding issue).")
