"""The ``deepspeed`` checkpoint backend: DeepSpeed's own files for the ZeRO strategy.

Layout under a checkpoint folder::

    ds/state/        what ``engine.save_checkpoint`` writes (every rank its partition)
    universal/       DeepSpeed's universal format, converted on first resume on another world size

What this module adds to DeepSpeed:

* **Async saves.** :class:`StagingCheckpointEngine` wraps DeepSpeed's checkpoint engine: while
  staging, ``save(state, path)`` copies the state into reused host buffers and queues it; the
  backend's write job hands the snapshots to the wrapped engine later, in a background thread.
* **Resume on another world size.** The checkpoint is converted once (rank 0) to DeepSpeed's
  universal per-parameter files, which are then placed into this run's partitions parameter by
  parameter (weights through :meth:`ZeroStrategy.load_model_weights`, AdamW moments here).
  DeepSpeed's own universal loader is not used: it copies param_groups[0]'s hyperparameters into
  every group (giving bigtrain's no-decay group weight decay) and empties stage 3's group
  parameter lists; one code path for stages 1-3 is also easier to keep exact.
* **Consolidation** of full fp32 weights (export, ``bigtrain generate``) in one CPU process.

This is the only module of ``checkpoint/`` that imports deepspeed (lazily, through the strategy's
importer, which selects DeepSpeed's CPU accelerator when no GPU is visible).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.checkpoint.backend import SaveJob
from bigtrain.checkpoint.manifest import Manifest
from bigtrain.checkpoint.staging import stage
from bigtrain.parallel.strategy import Strategy
from bigtrain.parallel.zero import ZeroStrategy, import_deepspeed

ZERO_TAG = "state"  # DeepSpeed's checkpoint "tag": the folder under ds/ that holds its files


class DeepSpeedBackend:
    """ZeRO's partitions in DeepSpeed's format; another world size goes through the universal format."""

    format = "deepspeed"
    subdir = "ds"

    def save(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             staged: bool, process_group: Any | None) -> SaveJob:
        """``engine.save_checkpoint`` into ``ckpt_dir/ds/state`` (collective over the training group).

        ``universal_checkpoint_info`` is set on the module first: stages 1/2 write it into the model
        states only when present, and the universal conversion (needed to resume on another world
        size) refuses checkpoints without it. With ``staged`` the files are only copied to host memory
        here; the returned job writes them.
        """
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        zero = _zero(strategy)
        engine = zero.engine
        module = engine.module
        if getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
            setattr(module, UNIVERSAL_CHECKPOINT_INFO,
                    {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
        if not isinstance(engine.checkpoint_engine, StagingCheckpointEngine):
            engine.checkpoint_engine = StagingCheckpointEngine(engine.checkpoint_engine)
        writer: StagingCheckpointEngine = engine.checkpoint_engine
        writer.staging = staged
        try:
            engine.save_checkpoint(str(ckpt_dir / self.subdir), tag=ZERO_TAG, client_state={}, save_latest=False)
        finally:
            writer.staging = False
        return SaveJob(write=writer.write_pending, extra={"zero_stage": zero.zero.stage, "deepspeed_tag": ZERO_TAG})

    def load(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *,
             saved_world_size: int, process_group: Any | None) -> None:
        """Load a :meth:`save` checkpoint; on another world size through the universal format, converted
        once on rank 0 into ``ckpt_dir/universal`` (written as ``universal.tmp`` and renamed, so a crash
        never leaves a half-converted folder that looks complete)."""
        import torch.distributed as tdist

        zero = _zero(strategy)
        path = ckpt_dir / self.subdir
        if saved_world_size != zero.info.world_size and zero.zero_optimizer is not None:
            scratch = ckpt_dir / "universal"
            if zero.info.is_main and not scratch.is_dir():
                convert_to_universal(path, scratch)
            if tdist.is_initialized():
                tdist.barrier()
            _load_universal(zero, scratch / ZERO_TAG / "zero")
            return
        groups_before = [dict(g) for g in zero.inner_optimizer().param_groups]
        loaded, _ = zero.engine.load_checkpoint(str(path), tag=ZERO_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        for group, before in zip(zero.inner_optimizer().param_groups, groups_before, strict=True):
            group.update({k: v for k, v in before.items() if k != "params"})  # this run's hyperparameters win
        if zero.zero_optimizer is not None:
            _relink_optimizer_state(zero)

    def read_full_weights(self, ckpt_dir: Path) -> dict[str, torch.Tensor]:
        return consolidate_zero_checkpoint(ckpt_dir / self.subdir)

    def required_files(self, ckpt_dir: Path, manifest: Manifest) -> set[str]:
        """The model states, and with ZeRO stage >= 1 one optimizer-state partition per saving rank."""
        state = f"{self.subdir}/{ZERO_TAG}"
        if int(manifest.extra.get("zero_stage", 0)) == 0:
            return {f"{state}/mp_rank_00_model_states.pt"}
        return {f"{state}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(manifest.world_size)}


def _zero(strategy: Strategy) -> ZeroStrategy:
    if not isinstance(strategy, ZeroStrategy):
        raise TypeError(f"the deepspeed checkpoint backend needs the ZeRO strategy, got {type(strategy).__name__}")
    return strategy


# ---------------------------------------------------------------------------- async saves
class StagingCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine so that a save can be written in the background.

    While ``staging`` is on, ``save(state, path)`` copies the state into reused host buffers
    (:func:`bigtrain.checkpoint.staging.stage`) and queues it; :meth:`write_pending` later hands
    the snapshots to the wrapped engine. Everything else (load, commit, makedirs, ...) is the
    wrapped engine's, so the files are exactly what DeepSpeed writes itself.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.staging = False
        self._pending: list[tuple[Any, str]] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._root = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create(self, info: Any) -> Any:
        self._root = str(info.save_dir)
        return self._inner.create(info)

    def save(self, state_dict: Any, path: str) -> None:
        if not self.staging:
            self._inner.save(state_dict, path)
            return
        # Buffers are keyed by the file's place inside the checkpoint, so the next save reuses them.
        key = os.path.relpath(path, self._root) + ":"
        self._pending.append((stage(state_dict, self._buffers, key), path))

    def write_pending(self) -> None:
        pending, self._pending = self._pending, []
        for state, path in pending:
            self._inner.save(state, path)


# ---------------------------------------------------------------------------- another world size
def convert_to_universal(ds_dir: str | Path, out_dir: str | Path) -> None:
    """DeepSpeed checkpoint ``ds_dir/state`` → universal checkpoint ``out_dir/state`` (one process, CPU)."""
    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=os.path.join(str(ds_dir), ZERO_TAG),
                              output_folder=os.path.join(tmp, ZERO_TAG), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tqdm bars, prints
        ds_to_universal(args)
    os.replace(tmp, str(out_dir))


def _load_universal(zero: ZeroStrategy, zero_dir: Path) -> None:
    """Place DeepSpeed's universal per-parameter files (fp32 weights, AdamW moments, step) into this run's
    partitions: weights through the strategy, then the moments and AdamW's scalar state."""
    def tensor(name: str, key: str, shape: torch.Size) -> torch.Tensor:
        # DeepSpeed's universal files are pickles (its whole format is): see docs/checkpointing.md.
        value = torch.load(zero_dir / name / f"{key}.pt", map_location="cpu", weights_only=False)
        found: torch.Tensor = value["param"] if isinstance(value, dict) else value
        return found.reshape(shape).float()

    module = zero.engine.module
    names = {id(p): name for name, p in module.named_parameters()}
    global_state = torch.load(zero_dir / "optimizer_state.pt", map_location="cpu", weights_only=False)
    # AdamW's scalar state (step): stage 3 keeps it in the global file, stages 1/2 per parameter.
    inner_sd = global_state.get("optimizer_state_dict") or {"state": {}}
    first: dict[str, Any] = next(iter(inner_sd["state"].values()), {})
    scalars = {k: v for k, v in first.items() if not (isinstance(v, torch.Tensor) and v.ndim > 0)}
    weights: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    for idx, p in enumerate(zero.param_order):
        name = names[id(p)]
        shape = zero.full_shape(p)
        weights[name] = tensor(name, "fp32", shape)
        state[idx] = {**scalars, "exp_avg": tensor(name, "exp_avg", shape),
                      "exp_avg_sq": tensor(name, "exp_avg_sq", shape)}
        if (zero_dir / name / "step.pt").is_file():
            step = torch.load(zero_dir / name / "step.pt", map_location="cpu", weights_only=False)
            state[idx]["step"] = step["param"] if isinstance(step, dict) else step
    for name, buf in module.state_dict().items():  # persistent buffers are not in the universal files
        weights.setdefault(name, buf)
    zero.load_model_weights(zero.engine, weights)
    _set_full_optimizer_state(zero, state)


def _set_full_optimizer_state(zero: ZeroStrategy, saved: dict[int, dict[str, Any]]) -> None:
    """Full (unpartitioned) AdamW state, indexed like bigtrain's optimizer, into ZeRO's partitions."""
    if not saved:
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = zero.inner_optimizer()
    _prime_optimizer_state(zero, inner)
    first = saved[next(iter(saved))]
    for idx, p in enumerate(zero.param_order):
        for key, value in saved[idx].items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                safe_set_full_optimizer_state(p, value.to(zero.device, torch.float32), key)
    zopt = zero.zero_optimizer
    assert zopt is not None  # a checkpoint written with optimizer state has a ZeRO optimizer (stage >= 1)
    # Stage 3 keeps the flat partitions out of param_groups between steps.
    flats = (list(zopt.fp32_partitioned_groups_flat) if zero.zero.stage == 3
             else [flat for group in inner.param_groups for flat in group["params"]])
    for flat in flats:
        st = inner.state.get(flat)
        if st is None:
            continue
        for key, value in first.items():
            if not (isinstance(value, torch.Tensor) and value.ndim > 0):
                st[key] = value.clone().to(st[key].device) if isinstance(value, torch.Tensor) else value


def _prime_optimizer_state(zero: ZeroStrategy, inner: torch.optim.Optimizer) -> None:
    """Create AdamW's (lazy) state on ZeRO's flat partitions so it can be overwritten.

    One step with zero gradients and lr=0 leaves every weight bit-identical
    (AdamW: p*(1-0*wd) + 0*m/(sqrt(v)+eps)) and allocates exp_avg / exp_avg_sq.
    """
    zopt = zero.zero_optimizer
    if zero.zero.stage == 3 and zopt is not None:
        # Stage 3 keeps each group's "params" empty and puts its flat fp32 sub-group partition in
        # only for the duration of a step; do the same here.
        for sub, flat in enumerate(zopt.fp32_partitioned_groups_flat):
            if not flat.numel() or "exp_avg" in inner.state.get(flat, {}):
                continue
            group = inner.param_groups[zopt.sub_group_to_group_id[sub]]
            params, lr = group["params"], group["lr"]
            group["params"], group["lr"] = [flat], 0.0
            flat.grad = torch.zeros_like(flat)
            try:
                inner.step()
            finally:
                flat.grad = None
                group["params"], group["lr"] = params, lr
        return
    missing = [p for g in inner.param_groups for p in g["params"] if p.numel() and p not in inner.state]
    if missing:
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        for p in missing:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in missing:
            p.grad = None
        for g, lr in zip(inner.param_groups, lrs, strict=True):
            g["lr"] = lr
    _relink_optimizer_state(zero)


def _relink_optimizer_state(zero: ZeroStrategy) -> None:
    """Stages 1/2: (re)create the per-parameter views into AdamW's flat state that safe_*_optimizer_state use.

    DeepSpeed links them once, right after the first param group's first step, when later
    groups (bigtrain's no-decay group) have no state yet; relinking fixes those views.
    """
    zopt = zero.zero_optimizer
    if zopt is not None and hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


# ---------------------------------------------------------------------------- consolidation
def consolidate_zero_checkpoint(ds_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a DeepSpeed checkpoint written by :meth:`DeepSpeedBackend.save`.

    Pure file reading on the CPU: no GPU and no process group of the original world size.
    """
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage_path = os.path.join(str(ds_dir), ZERO_TAG)
    model_files = [f for f in os.listdir(stage_path) if f.endswith("model_states.pt")]
    optim_files = [f for f in os.listdir(stage_path) if f.endswith("optim_states.pt")]
    if not optim_files:  # stage 0: the model states hold the full weights
        sd = torch.load(os.path.join(stage_path, sorted(model_files)[0]), map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in sd["module"].items()}
    with contextlib.redirect_stdout(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=ZERO_TAG))
