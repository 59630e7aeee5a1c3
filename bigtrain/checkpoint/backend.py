"""The checkpoint backend protocol: how one file format writes and reads a run's model + optimizer.

:class:`~bigtrain.checkpoint.manager.CheckpointManager` owns everything around the weights (the
commit protocol, manifests, checksums, retention, per-rank data/RNG files) and asks a backend
for the model and optimizer part only. Two backends exist:

* ``dcp`` (:mod:`bigtrain.checkpoint.dcp`): torch.distributed.checkpoint shards, for the single,
  DDP and FSDP2 strategies; reshards on load.
* ``deepspeed`` (:mod:`bigtrain.checkpoint.deepspeed`): DeepSpeed's own files, for ZeRO; another
  world size is loaded through DeepSpeed's universal format.

A strategy names its format in ``Strategy.checkpoint_format``; :func:`backend_for` maps it to a
fresh backend object (one per manager: backends keep reusable host buffers for async saves).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bigtrain.checkpoint.manifest import Manifest
from bigtrain.parallel.strategy import Strategy


@dataclass
class SaveJob:
    """What a backend's save leaves to do: ``write`` the files (no training collectives: may run in a
    background thread) and ``extra`` facts for the manifest."""

    write: Callable[[], None]
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointBackend(Protocol):
    """One checkpoint file format. Every method is called on every rank (they may be collective)."""

    format: str  # the manifest's "backend" value
    subdir: str  # the folder inside a checkpoint that holds this backend's files

    def save(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             staged: bool, process_group: Any | None) -> SaveJob:
        """Capture the state for ``ckpt_dir/subdir``. With ``staged`` only copy it to host memory here and
        leave the file writes to the returned job; without, the job still writes (the caller runs it)."""
        ...

    def load(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             saved_world_size: int, process_group: Any | None) -> None:
        """Restore model and optimizer from ``ckpt_dir/subdir`` (saved by ``saved_world_size`` ranks); this
        run's optimizer hyperparameters (lr, betas, weight decay) win over the checkpoint's."""
        ...

    def read_full_weights(self, ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """The full, unsharded model weights, read in one CPU process (no process group, any world size)."""
        ...

    def required_files(self, ckpt_dir: Path, manifest: Manifest) -> set[str]:
        """Files (relative to ``ckpt_dir``) a complete checkpoint of this format must hold, from the
        format's own index where it has one; verification checks the manifest lists each of them."""
        ...


FORMATS = ("dcp", "deepspeed")


def backend_for(checkpoint_format: str) -> CheckpointBackend:
    """A new backend for ``checkpoint_format`` (``Strategy.checkpoint_format`` or a manifest's ``backend``)."""
    if checkpoint_format == "dcp":
        from bigtrain.checkpoint.dcp import DCPBackend

        return DCPBackend()
    if checkpoint_format == "deepspeed":
        from bigtrain.checkpoint.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend()
    raise ValueError(f"unknown checkpoint format {checkpoint_format!r}; known: {', '.join(FORMATS)}")
