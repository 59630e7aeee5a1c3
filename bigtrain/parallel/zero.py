"""DeepSpeed ZeRO stages 0/1/2/3 behind the :class:`Strategy` interface.

This is the only module that imports ``deepspeed`` (lazily, inside :meth:`ZeroStrategy.wrap`).
Users never write a DeepSpeed JSON: :func:`deepspeed_config` generates it from ``parallel.zero``
and the ``train`` section, then merges ``parallel.zero.extra`` on top.

How the trainer's loop maps onto the DeepSpeed engine:

* The trainer divides each micro-batch loss by the number of micro-batches itself, so
  ``engine.backward`` is called with ``scale_wrt_gas=False`` (no second division); DeepSpeed
  averages gradients over data-parallel ranks, exactly like DDP.
* The accumulation boundary is set explicitly: ``no_sync`` marks the micro-batches inside it as
  non-boundary, the last one (outside ``no_sync``) is the boundary, and ``step`` calls
  ``engine.step()`` once per optimizer step.
* DeepSpeed clips inside ``engine.step()`` (``gradient_clipping``), but the trainer asks for the
  norm before ``step``: :meth:`clip_grad_norm` returns a scalar tensor that :meth:`step` fills
  with ``engine.get_global_grad_norm()`` (the global pre-clip norm); the trainer reads it later.
* The LR schedule stays bigtrain's: the trainer writes ``group["lr"]`` into the returned
  optimizer's ``param_groups``, which for ZeRO are the wrapped torch optimizer's own groups.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig, ZeroConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.strategy import OptimizerFactory, Strategy

if TYPE_CHECKING:
    from bigtrain.train.config import TrainConfig

# DeepSpeed prints progress every ``steps_per_print`` steps; bigtrain's loggers do that already.
_NEVER = 1 << 30


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in ``extra`` win."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(zero: ZeroConfig, *, compute_dtype: torch.dtype, micro_batch_size: int, accum_steps: int,
                     world_size: int, grad_clip: float, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (``zero.extra`` merged last, so it overrides)."""
    zero_opt: dict[str, Any] = {"stage": zero.stage}
    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if zero.offload_params:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch_size * accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero_opt,
        # bigtrain's own torch AdamW (with its decay / no-decay groups) is the optimizer.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if compute_dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    elif compute_dtype == torch.float16:
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _merge(cfg, zero.extra)


def _import_deepspeed() -> Any:
    """Import deepspeed, selecting its CPU accelerator when no GPU is visible (must precede the import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    try:
        import deepspeed  # noqa: PLC0415 - optional heavy dependency, imported only when chosen
    except ImportError as exc:
        from bigtrain.errors import missing_package

        raise missing_package("deepspeed", "parallel.strategy=zero", "use parallel.strategy=fsdp", exc) from None
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


class ZeroStrategy(Strategy):
    """Data parallel with DeepSpeed ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also parameters."""

    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig, train: "TrainConfig",
                 accum_steps: int) -> None:
        super().__init__(info, precision)
        self.cfg = cfg
        self.zero = zero = cfg.zero
        # Stage 3 gathers each block's parameters in module hooks that torch.compile cannot trace
        # through; DeepSpeed would need its own engine.compile(). Stages 0-2 hold plain parameters.
        self.compile = bool(train.compile) and zero.stage < 3
        if train.compile and zero.stage == 3 and info.is_main:
            print("zero: train.compile is not applied under ZeRO stage 3 (its parameter-gathering hooks); "
                  "activation checkpointing still is. Use stage 1/2 or fsdp to compile blocks.", flush=True)
        self.grad_clip = float(train.grad_clip)
        self.ds_config = deepspeed_config(
            zero, compute_dtype=self.compute_dtype, micro_batch_size=train.micro_batch_size,
            accum_steps=accum_steps, world_size=info.world_size, grad_clip=self.grad_clip,
            on_cuda=info.device.type == "cuda",
        )
        self.engine: Any = None
        self._order: list[nn.Parameter] = []  # parameters in bigtrain's optimizer order (checkpoint indices)
        self._group_sizes: list[int] = []  # sizes of bigtrain's param groups (decay, no-decay)
        self._norm: torch.Tensor | None = None

    # -- setup ---------------------------------------------------------------------
    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group even for one process (torchrun-less ``zero`` debug runs)."""
        import torch.distributed as tdist

        if not tdist.is_initialized():
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
                os.environ.setdefault(key, value)  # DeepSpeed's sanity checks read these
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        deepspeed = _import_deepspeed()
        self._ensure_process_group()
        # Every rank materializes and initializes the full model with the same seed (bit-identical
        # to SingleStrategy), then deepspeed.initialize partitions it. For stage 3 this means one
        # full fp32 copy per rank during set-up: fine up to models that fit one device, which is
        # what this first version supports; deepspeed.zero.Init (partition at construction) is
        # the follow-up for models that do not.
        parallelize(model, self.cfg, compile=self.compile)  # act-ckpt → compile; DeepSpeed shards below
        model.to_empty(device=self.device)
        model.init_weights(seed)  # type: ignore[operator]
        optimizer = make_optimizer(model)
        self._order = [p for group in optimizer.param_groups for p in group["params"]]
        self._group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        if self.info.is_main:
            print("deepspeed config: " + json.dumps(self.ds_config, separators=(",", ":"), sort_keys=True), flush=True)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engine = engine
        engine.set_gradient_accumulation_boundary(True)
        shared = self._share_fp32_masters()
        if shared and self.info.is_main:
            print(f"zero: fp32 run, master weights share storage with the working partitions ({shared} groups)",
                  flush=True)
        return engine, ds_optimizer

    def _share_fp32_masters(self) -> int:
        """In an fp32 run, make DeepSpeed's fp32 master partitions share storage with the working partitions.

        ZeRO keeps a "master" fp32 copy of this rank's partition for the optimizer and copies it
        back into the working (normally bf16) partition after each step. When the working weights
        are already fp32 on the same device the copy is pure waste: 4 bytes/param/world_size.
        DeepSpeed's stage 3 means to skip it, but its check compares a ``torch.device`` with a
        device-name string, which is never equal, and stages 1/2 always clone. Pointing the
        master's ``.data`` at the working partition keeps every DeepSpeed object (optimizer
        groups and state keyed by the master tensors) as it is; the optimizer then updates the
        working weights in place and the copy back becomes a copy onto itself. Values are
        identical at this point (the master was cloned from the partition), so numerics do not
        change. Returns how many groups now share storage.
        """
        zopt = self._zero_optimizer
        if zopt is None or self.compute_dtype != torch.float32 or self.zero.offload_optimizer or self.zero.offload_params:
            return 0
        if self.zero.stage == 3:
            pairs = list(zip(getattr(zopt, "fp16_partitioned_groups_flat", []),
                             getattr(zopt, "fp32_partitioned_groups_flat", [])))
        else:
            import torch.distributed as tdist

            dp_groups = getattr(zopt, "real_dp_process_group", [])
            pairs = [(groups[tdist.get_rank(group=dp_groups[i])], master) for i, (groups, master) in
                     enumerate(zip(getattr(zopt, "parallel_partitioned_bit16_groups", []),
                                   getattr(zopt, "single_partition_of_fp32_groups", [])))]
        shared = 0
        for working, master in pairs:
            if (working is None or master is None or working is master or working.dtype != master.dtype
                    or working.device != master.device or working.shape != master.shape):
                continue
            if not torch.equal(working, master):  # never alias tensors that do not already agree
                continue
            master.data = working.data
            shared += 1
        if shared and hasattr(zopt, "_link_all_hp_params"):
            # Stages 1/2 hold per-parameter views ("hp fragments") into the master partition, used
            # by checkpointing (safe_get/set_full_fp32_param); rebuild them over the new storage.
            zopt._link_all_hp_params()
            zopt._hp_optimizer_states_linked = False
        return shared

    @property
    def _zero_optimizer(self) -> Any | None:
        """DeepSpeed's ZeRO optimizer wrapper (None at stage 0, where the torch optimizer is used as is)."""
        return self.engine.optimizer if self.engine.zero_optimization() else None

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW doing the math (on ZeRO's flat fp32 partitions for stages 1-3)."""
        zopt = self._zero_optimizer
        return zopt.optimizer if zopt is not None else self.engine.optimizer

    # -- step ----------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Micro-batches inside are not the accumulation boundary (no reduction, no step)."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divided by the number of micro-batches: no second division here.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        if max_norm != self.grad_clip:
            raise ValueError(f"ZeroStrategy clips at train.grad_clip={self.grad_clip} (set in the DeepSpeed config); "
                             f"got max_norm={max_norm}")
        if self._zero_optimizer is None and not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            # Stage 0 in fp32: gradients are already all-reduced at the boundary backward, and
            # DeepSpeed's fp32 path clips without recording the norm, so compute it here.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            return self._norm
        # Filled in by step(): DeepSpeed computes the global pre-clip norm inside engine.step().
        self._norm = torch.full((), float("nan"), device=self.device)
        return self._norm

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if self._norm is not None and norm is not None:
            self._norm.fill_(float(norm))
        self._norm = None

    # -- checkpoint ------------------------------------------------------------------
    checkpoint_format = "deepspeed"

    def save_native(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Any, *,
                    staged: bool = False) -> dict[str, Any]:
        """DeepSpeed's own checkpoint (every rank writes its partition) under ``path/state`` (collective).

        ``universal_checkpoint_info`` is set on the module first: stages 1/2 write it into the model
        states only when present, and DeepSpeed's universal conversion (needed to resume on another
        world size) refuses checkpoints without it. With ``staged`` (async saves) the files are only
        copied to host memory here; :meth:`write_staged` writes them.
        """
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        module = self.engine.module
        if getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
            setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
        if not isinstance(self.engine.checkpoint_engine, StagingCheckpointEngine):
            self.engine.checkpoint_engine = StagingCheckpointEngine(self.engine.checkpoint_engine)
        writer: StagingCheckpointEngine = self.engine.checkpoint_engine
        writer.staging = staged
        try:
            self.engine.save_checkpoint(str(path), tag=ZERO_TAG, client_state={}, save_latest=False)
        finally:
            writer.staging = False
        return {"zero_stage": self.zero.stage, "deepspeed_tag": ZERO_TAG}

    def write_staged(self) -> None:
        engine = getattr(self.engine, "checkpoint_engine", None)
        if isinstance(engine, StagingCheckpointEngine):
            engine.write_pending()

    def load_native(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Any, *, saved_world_size: int,
                    scratch: Any) -> None:
        """Load a :meth:`save_native` checkpoint; on another world size, through DeepSpeed's universal format.

        This run's optimizer hyperparameters (from its config) win over the checkpoint's. The
        conversion runs once, on rank 0, into ``scratch`` (written as ``scratch.tmp`` and renamed,
        so a crash never leaves a half-converted folder that looks complete).
        """
        import torch.distributed as tdist

        if saved_world_size != self.info.world_size and self._zero_optimizer is not None:
            if self.info.is_main and not os.path.isdir(scratch):
                convert_to_universal(path, scratch)
            if tdist.is_initialized():
                tdist.barrier()
            self._load_universal(model, os.path.join(str(scratch), ZERO_TAG, "zero"))
            return
        groups_before = [dict(g) for g in self._inner_optimizer().param_groups]
        loaded, _ = self.engine.load_checkpoint(str(path), tag=ZERO_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        for group, before in zip(self._inner_optimizer().param_groups, groups_before):
            group.update({k: v for k, v in before.items() if k != "params"})  # this run's hyperparameters win
        if self._zero_optimizer is not None:
            self._relink_optimizer_state()

    def _load_universal(self, model: nn.Module, zero_dir: str) -> None:
        """Load DeepSpeed's universal per-parameter files (fp32 weights, AdamW moments, step) through
        :meth:`load_state_dict`, which places full tensors into this run's partitions.

        DeepSpeed's own universal loader is not used: it copies param_groups[0]'s hyperparameters
        into every group (giving bigtrain's no-decay group weight decay) and empties stage 3's
        group parameter lists; one code path for stages 1-3 is also easier to keep exact.
        """
        def tensor(name: str, key: str, shape: torch.Size) -> torch.Tensor:
            value = torch.load(os.path.join(zero_dir, name, f"{key}.pt"), map_location="cpu", weights_only=False)
            value = value["param"] if isinstance(value, dict) else value
            return value.reshape(shape).float()

        module = self.engine.module
        names = {id(p): name for name, p in module.named_parameters()}
        global_state = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), map_location="cpu", weights_only=False)
        # AdamW's scalar state (step): stage 3 keeps it in the global file, stages 1/2 per parameter.
        inner_sd = global_state.get("optimizer_state_dict") or {"state": {}}
        first = next(iter(inner_sd["state"].values()), {})
        scalars = {k: v for k, v in first.items() if not (isinstance(v, torch.Tensor) and v.ndim > 0)}
        weights: dict[str, torch.Tensor] = {}
        state: dict[int, dict[str, Any]] = {}
        for idx, p in enumerate(self._order):
            name = names[id(p)]
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            weights[name] = tensor(name, "fp32", shape)
            state[idx] = {**scalars, "exp_avg": tensor(name, "exp_avg", shape), "exp_avg_sq": tensor(name, "exp_avg_sq", shape)}
            if os.path.isfile(os.path.join(zero_dir, name, "step.pt")):
                step = torch.load(os.path.join(zero_dir, name, "step.pt"), map_location="cpu", weights_only=False)
                state[idx]["step"] = step["param"] if isinstance(step, dict) else step
        for name, buf in module.state_dict().items():  # persistent buffers are not in the universal files
            weights.setdefault(name, buf)
        self.load_state_dict(model, self.engine.optimizer, {"model": weights, "optimizer": {"state": state}})

    def load_model_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Full weights (``model.init_from``) into the working and the fp32 master partitions."""
        self.load_state_dict(model, self.engine.optimizer, {"model": weights, "optimizer": {"state": {}}})

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Full fp32 weights and AdamW state in torch's format, gathered from the partitions (collective)."""
        if self._zero_optimizer is None:
            return {"model": self.engine.module.state_dict(), "optimizer": self.engine.optimizer.state_dict()}
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        module = self.engine.module
        full_model: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            full_model[name] = safe_get_full_fp32_param(p).detach().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
        for name, buf in module.state_dict().items():  # persistent buffers (not partitioned by ZeRO)
            full_model.setdefault(name, buf.detach().clone())

        inner = self._inner_optimizer()
        sample = next((inner.state[p] for g in inner.param_groups for p in g["params"] if p in inner.state), None)
        state: dict[int, dict[str, Any]] = {}
        if sample:  # no state before the first step
            self._relink_optimizer_state()
            per_element = [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.ndim > 0]
            scalars = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                       for k, v in sample.items() if k not in per_element}
            for idx, p in enumerate(self._order):
                entry = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scalars.items()}
                for key in per_element:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().reshape(
                        p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
                state[idx] = entry
        groups, start = [], 0
        for group, n in zip(inner.param_groups, self._group_sizes):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        return {"model": full_model, "optimizer": {"state": state, "param_groups": groups}}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self._zero_optimizer is None:
            self.engine.module.load_state_dict(state["model"])
            self.engine.optimizer.load_state_dict(state["optimizer"])
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module = self.engine.module
        weights = state["model"]
        params = list(module.parameters())
        # The working (possibly bf16, possibly partitioned) weights...
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=0) if self.zero.stage == 3
                  else contextlib.nullcontext())
        with gather, torch.no_grad():
            module.load_state_dict(weights)
        # ...and the fp32 master partitions the optimizer updates.
        for name, p in module.named_parameters():
            if p.requires_grad:
                safe_set_full_fp32_param(p, weights[name].to(self.device, torch.float32))

        saved = state["optimizer"]["state"]
        if not saved:
            return
        inner = self._inner_optimizer()
        self._prime_optimizer_state(inner)
        first = saved[next(iter(saved))]
        for idx, p in enumerate(self._order):
            for key, value in saved[idx].items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    safe_set_full_optimizer_state(p, value.to(self.device, torch.float32), key)
        zopt = self._zero_optimizer
        # Stage 3 keeps the flat partitions out of param_groups between steps.
        flats = (list(zopt.fp32_partitioned_groups_flat) if self.zero.stage == 3
                 else [flat for group in inner.param_groups for flat in group["params"]])
        for flat in flats:
            st = inner.state.get(flat)
            if st is None:
                continue
            for key, value in first.items():
                if not (isinstance(value, torch.Tensor) and value.ndim > 0):
                    st[key] = value.clone().to(st[key].device) if isinstance(value, torch.Tensor) else value

    def _prime_optimizer_state(self, inner: torch.optim.Optimizer) -> None:
        """Create AdamW's (lazy) state on ZeRO's flat partitions so it can be overwritten.

        One step with zero gradients and lr=0 leaves every weight bit-identical
        (AdamW: p*(1-0*wd) + 0*m/(sqrt(v)+eps)) and allocates exp_avg / exp_avg_sq.
        """
        zopt = self._zero_optimizer
        if self.zero.stage == 3 and zopt is not None:
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
            for g, lr in zip(inner.param_groups, lrs):
                g["lr"] = lr
        self._relink_optimizer_state()

    def _relink_optimizer_state(self) -> None:
        """Stages 1/2: (re)create the per-parameter views into AdamW's flat state that safe_*_optimizer_state use.

        DeepSpeed links them once, right after the first param group's first step, when later
        groups (bigtrain's no-decay group) have no state yet; relinking fixes those views.
        """
        zopt = self._zero_optimizer
        if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
            zopt._hp_optimizer_states_linked = False
            zopt._lazy_init_hp_params_optimizer_state()

    # -- introspection ---------------------------------------------------------------
    def held_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds: working params (stage 3: its partitions), grads, fp32 masters + AdamW moments."""
        from bigtrain.parallel.memory import _count, _optimizer_tensors

        seen: set[tuple[str, int]] = set()
        module = self.engine.module
        zopt = self._zero_optimizer
        params: list[torch.Tensor] = []
        for p in module.parameters():
            params.append(p)  # stage 3: an empty placeholder (skipped) unless gathered or persistent
            if hasattr(p, "ds_tensor"):
                params.append(p.ds_tensor)
        n_params = _count(params, seen)

        grads: list[torch.Tensor] = [p.grad for p in module.parameters() if p.grad is not None]
        if zopt is not None:
            for attr in ("averaged_gradients", "grad_partitions_flat_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
                value = getattr(zopt, attr, None)
                if isinstance(value, torch.Tensor):
                    grads.append(value)
                elif isinstance(value, dict):
                    for v in value.values():
                        grads.extend(v if isinstance(v, list) else [v])
                elif isinstance(value, list):
                    grads.extend(v for v in value if isinstance(v, torch.Tensor))
            for flat in self._masters():
                if flat.grad is not None:
                    grads.append(flat.grad)
        n_grads = _count((g for g in grads if isinstance(g, torch.Tensor)), seen)

        inner = self._inner_optimizer()
        n_optim = _count(list(self._masters()) + list(_optimizer_tensors(inner)), seen)
        return {"params": n_params, "grads": n_grads, "optimizer": n_optim, "total": n_params + n_grads + n_optim}

    def _masters(self) -> list[torch.Tensor]:
        """The fp32 master partitions the inner optimizer steps (shared with the params when no copy is needed)."""
        zopt = self._zero_optimizer
        if zopt is None:
            return []
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            value = getattr(zopt, attr, None)
            if value:
                return [t for t in value if isinstance(t, torch.Tensor)]
        return []

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.engine.module


ZERO_TAG = "state"


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
        from bigtrain.checkpoint.staging import stage

        # Buffers are keyed by the file's place inside the checkpoint, so the next save reuses them.
        key = os.path.relpath(path, self._root) + ":"
        self._pending.append((stage(state_dict, self._buffers, key), path))

    def write_pending(self) -> None:
        pending, self._pending = self._pending, []
        for state, path in pending:
            self._inner.save(state, path)


def convert_to_universal(ds_dir: Any, out_dir: Any) -> None:
    """DeepSpeed checkpoint ``ds_dir/state`` → universal checkpoint ``out_dir/state`` (one process, CPU)."""
    import argparse
    import contextlib as _ctx
    import io
    import shutil

    _import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=os.path.join(str(ds_dir), ZERO_TAG), output_folder=os.path.join(tmp, ZERO_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with _ctx.redirect_stdout(io.StringIO()), _ctx.redirect_stderr(io.StringIO()):  # tqdm bars, progress prints
        ds_to_universal(args)
    os.replace(tmp, str(out_dir))


def consolidate_zero_checkpoint(ds_dir: Any) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a DeepSpeed checkpoint written by :meth:`ZeroStrategy.save_native`.

    Pure file reading on the CPU: no GPU and no process group of the original world size.
    """
    import contextlib as _ctx
    import io

    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage_path = os.path.join(str(ds_dir), ZERO_TAG)
    model_files = [f for f in os.listdir(stage_path) if f.endswith("model_states.pt")]
    optim_files = [f for f in os.listdir(stage_path) if f.endswith("optim_states.pt")]
    if not optim_files:  # stage 0: the model states hold the full weights
        sd = torch.load(os.path.join(stage_path, sorted(model_files)[0]), map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in sd["module"].items()}
    with _ctx.redirect_stdout(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=ZERO_TAG))
