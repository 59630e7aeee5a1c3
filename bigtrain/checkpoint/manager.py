"""Save, find and load whole-training-state checkpoints in a run folder.

Layout::

    RUN_DIR/checkpoints/step_000123/state.pt       model, optimizer, data, RNG, counters, config
    RUN_DIR/checkpoints/step_000123/manifest.json  step, config hash, file sizes
    RUN_DIR/checkpoints/latest                     name of the newest committed checkpoint

Commit is atomic: a checkpoint is written into ``step_000123.tmp/``, fsynced, renamed, and only
then is ``latest`` replaced; a crash at any moment leaves the previous checkpoint selected.
(The checkpointing issue replaces ``state.pt`` with per-rank DCP shards behind the same API.)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.errors import UserError

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng() -> dict[str, Any]:
    """Every RNG that can affect the next step."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Checkpoints of one run folder."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], *, config_hash: str) -> Path:
        """Atomically write ``state`` as the checkpoint of ``step`` and select it as latest."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dirname(step)
        tmp = self.root / (step_dirname(step) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state_path = tmp / STATE_FILE
        with open(state_path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        manifest = {
            "step": step,
            "config_hash": config_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {STATE_FILE: state_path.stat().st_size},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = self.root / (LATEST_FILE + ".tmp")
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.root / LATEST_FILE)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.list()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ find / load
    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")
                and not p.name.endswith(".tmp") and (p / MANIFEST_FILE).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / MANIFEST_FILE).is_file():
                return candidate
        found = self.list()
        return found[-1] if found else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Turn ``checkpoint.resume`` (auto | never | PATH) into a checkpoint folder or None."""
    if resume == "never":
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest()
    path = Path(resume).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return path
    found = CheckpointManager(path).latest() if path.is_dir() else None
    if found is None:
        raise UserError(
            f"checkpoint.resume={resume!r}: no checkpoint there. Give a checkpoint folder (…/checkpoints/step_N), "
            f"a run folder that has checkpoints, 'auto' or 'never'."
        )
    return found


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint's full state (weights_only=False: it holds RNG states and config dicts we wrote)."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise UserError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete or not a bigtrain checkpoint.")
    return torch.load(state_path, map_location=map_location, weights_only=False)
