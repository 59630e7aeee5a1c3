"""Each rank's small state next to the model/optimizer shards: data position, RNG streams, counters.

Written as ``rank/rank_00000.pt`` with ``torch.save`` but holding only tensors and plain values
(dicts, lists, tuples, numbers, strings), so it is read back with ``torch.load(weights_only=True)``:
a crafted checkpoint cannot run code through bigtrain's own files. (The model/optimizer part is in
third-party formats that are pickles at heart: DCP's ``.metadata`` is read with a restricted
unpickler, :mod:`bigtrain.checkpoint.dcp`; DeepSpeed's files are plain pickles; see
docs/checkpointing.md.)
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

RANK_DIR = "rank"


class RankStateError(Exception):
    """A per-rank state file that cannot be read safely (the message names the file and why)."""


def rank_file(rank: int) -> str:
    """The per-rank state file of ``rank``, relative to the checkpoint folder."""
    return f"{RANK_DIR}/rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    """Every RNG that can affect the next step (this process), as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """RNG for a rank that did not exist when the checkpoint was saved: a fresh stream per (seed, step, rank)."""
    mixed = (seed * 1_000_003 + step * 65_537 + rank) % (2**32)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def save_rank_state(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)


def load_rank_state(path: Path) -> dict[str, Any]:
    """Read a per-rank state file without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankStateError(f"{path}: holds objects bigtrain does not load from a checkpoint ({first}); it was "
                             f"written by another program or an older bigtrain, or tampered with") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise RankStateError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"data", "rng"} <= set(state):
        raise RankStateError(f"{path}: not a bigtrain per-rank state (expected data and rng entries)")
    return state
