"""The one path for user-facing messages: rank-aware, redirectable, safe to call from anywhere.

Every module that tells the user something calls :func:`say` (stdout) or :func:`warn` (stderr)
instead of ``print``. A message is printed by rank 0 only, unless ``every_rank=True`` (for what only
one rank can know: its own failure, its own stack, a signal it received); such a message names its
rank itself (``rank_label()`` helps).

The rank is set once by :func:`set_rank` (``parallel.dist.init`` does it); before that it is 0, so
single-process tools (the CLI verbs, data preparation) print as before. The console logger
redirects messages through :func:`set_sink` so they appear above its progress bar; tests capture
them with :func:`capture`.

This module sits at the bottom of the import layering (beside ``errors`` and ``sections``): it
imports nothing from bigtrain, so every layer may use it.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Sink = Callable[[str], None]

_rank = 0
_world_size = 1
_sink: Sink | None = None


def set_rank(rank: int, world_size: int) -> None:
    """This process's place in the launch (called once the launcher's environment is read)."""
    global _rank, _world_size
    _rank, _world_size = int(rank), int(world_size)


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world_size


def is_main() -> bool:
    return _rank == 0


def set_sink(sink: Sink | None) -> Sink | None:
    """Send this rank's messages (both :func:`say` and :func:`warn`) to ``sink`` (None: stdout / stderr).
    Returns the previous sink."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def rank_label() -> str:
    """``"rank 1 of 4"`` (empty for a single process): for messages printed by every rank."""
    return f"rank {_rank} of {_world_size}" if _world_size > 1 else ""


def say(message: str, *, every_rank: bool = False) -> None:
    """Tell the user something (stdout): rank 0 only, unless ``every_rank``."""
    if not every_rank and _rank != 0:
        return
    if _sink is not None:
        _sink(message)
    else:
        print(message, flush=True)


def warn(message: str, *, every_rank: bool = False) -> None:
    """A warning or failure report (stderr): rank 0 only, unless ``every_rank``."""
    if not every_rank and _rank != 0:
        return
    if _sink is not None:
        _sink(message)
    else:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect the messages printed inside the block (tests), restoring the previous sink after."""
    lines: list[str] = []
    previous = set_sink(lines.append)
    try:
        yield lines
    finally:
        set_sink(previous)
