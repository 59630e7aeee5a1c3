"""The ``checkpoint`` config section."""
from __future__ import annotations

from dataclasses import dataclass

from bigtrain.sections import ConfigError, Section, doc_field


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """When to save and whether to resume."""

    every_steps: int = doc_field(0, "Save every N optimizer steps (0 = only at the end).")
    at_end: bool = doc_field(True, "Save after the last step.")
    resume: str = doc_field("never", "auto = continue from the newest checkpoint in the run folder if any; never = "
                                     "start fresh; or a path to a checkpoint folder.")
    keep_last: int = doc_field(2, "Keep this many newest checkpoints (older ones are deleted after a newer one is "
                                  "committed).")
    keep_every_steps: int = doc_field(0, "Also keep every checkpoint whose step is a multiple of this forever "
                                         "(permanent milestones; 0 = none).")
    async_save: bool = doc_field(True, "Write checkpoints in a background thread: the step loop waits only for the "
                                       "copy to host memory (every strategy; for ZeRO, DeepSpeed's files are staged in "
                                       "host memory and written in the background).")

    def validate(self, path: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"{path}.every_steps: must be >= 0, got {self.every_steps}.")
        if self.keep_last < 1:
            raise ConfigError(f"{path}.keep_last: must be >= 1, got {self.keep_last}.")
        if self.keep_every_steps < 0:
            raise ConfigError(f"{path}.keep_every_steps: must be >= 0 (0 = no milestones), "
                              f"got {self.keep_every_steps}.")
        if not self.resume:
            raise ConfigError(f"{path}.resume: use auto, never, or a checkpoint path.")
