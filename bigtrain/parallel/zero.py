"""DeepSpeed ZeRO stages 0/1/2/3 behind the :class:`Strategy` interface.

This is the only module of ``parallel/`` that imports ``deepspeed`` (lazily: :func:`import_deepspeed`,
also used by the checkpoint backend :mod:`bigtrain.checkpoint.deepspeed`, which reads and writes
the engine's files). Users never write a DeepSpeed JSON: :func:`deepspeed_config` generates it from
``parallel.zero`` and the values the trainer passes (micro-batch size, accumulation, clipping), then
merges ``parallel.zero.extra`` on top.

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
import ctypes
import ctypes.util
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.parallel.apply import parallelize
from bigtrain.parallel.config import ParallelConfig, ZeroConfig
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.strategy import OptimizerFactory, Strategy

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


def import_deepspeed() -> Any:
    """Import deepspeed, selecting its CPU accelerator when no GPU is visible (must precede the import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    try:
        import deepspeed
    except ImportError as exc:
        from bigtrain.errors import missing_package

        raise missing_package("deepspeed", "parallel.strategy=zero", "use parallel.strategy=fsdp", exc) from None
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # On its CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce extension when
        # its communication layer starts (about a minute on two cores, and it needs a C++
        # compiler). Only its inference all-reduce uses it, which training never calls; marking
        # the op incompatible makes DeepSpeed skip the build and use torch.distributed.
        compatible = getattr(getattr(deepspeed, "ops", None), "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    return deepspeed


# glibc's mallopt parameter numbers (malloc.h) and the largest dynamic mmap threshold on 64-bit.
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


@contextlib.contextmanager
def _freed_memory_returned(enabled: bool) -> Iterator[None]:
    """While ZeRO-3 builds the model in host memory, hand freed whole parameters back to the OS.

    Each module is built whole and then partitioned, so set-up frees a whole parameter per module.
    glibc raises its mmap threshold after such frees and then serves the next ones from the heap,
    which keeps the freed memory resident: measured, the set-up peak stayed at ~1x the model
    instead of ~1/world_size. A fixed 64 KiB threshold during set-up maps every large tensor on its
    own (freed = returned); afterwards the threshold is set to glibc's dynamic maximum, where the
    dynamic rule would have taken it. No effect without glibc (or when parameters are on a GPU).
    """
    mallopt = None
    if enabled:
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)


class ZeroStrategy(Strategy):
    """Data parallel with DeepSpeed ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also parameters."""

    name = "zero"  # describe(): no compiled blocks under stage 3 (self.compile is off there)

    def __init__(self, info: DistInfo, precision: str, cfg: ParallelConfig, *, compile: bool | str,
                 micro_batch_size: int, grad_clip: float, accum_steps: int) -> None:
        super().__init__(info, precision)
        self.cfg = cfg
        self.zero = zero = cfg.zero
        # Stage 3 gathers each block's parameters in module hooks that torch.compile cannot trace
        # through; DeepSpeed would need its own engine.compile(). Stages 0-2 hold plain parameters.
        self.compile = compile if zero.stage < 3 else False
        if compile and zero.stage == 3:
            messages.say("zero: train.compile is not applied under ZeRO stage 3 (its parameter-gathering hooks); "
                         "activation checkpointing still is. Use stage 1/2 or fsdp to compile blocks.")
        self.grad_clip = float(grad_clip)
        self.ds_config = deepspeed_config(
            zero, compute_dtype=self.compute_dtype, micro_batch_size=micro_batch_size,
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

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory,
             seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        deepspeed = import_deepspeed()
        self._ensure_process_group()
        if self.zero.stage == 3:
            model = self._build_partitioned(model, seed)
        else:
            # Stages 0-2 keep whole parameters on every rank: materialize and initialize the full
            # model with the same seed (bit-identical to SingleStrategy); DeepSpeed shards the rest.
            parallelize(model, self.cfg, compile=self.compile)  # act-ckpt → compile
            model.to_empty(device=self.device)
            model.init_weights(seed)  # type: ignore[operator]  # a Decoder, typed as the nn.Module it is wrapped as
        optimizer = make_optimizer(model)
        self._order = [p for group in optimizer.param_groups for p in group["params"]]
        self._group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        messages.say("deepspeed config: " + json.dumps(self.ds_config, separators=(",", ":"), sort_keys=True))
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engine = engine
        engine.set_gradient_accumulation_boundary(True)
        shared = self._share_fp32_masters()
        if shared:
            messages.say(f"zero: fp32 run, master weights share storage with the working partitions ({shared} groups)")
        return engine, ds_optimizer

    def _build_partitioned(self, meta_model: nn.Module, seed: int) -> nn.Module:
        """Stage 3: no rank ever holds the whole model. The decoder is rebuilt inside
        ``deepspeed.zero.Init``, which partitions each module's parameters as soon as the module is
        constructed; then each parameter is gathered alone, filled with the sharding-independent
        init (the same weights as every other backend) and partitioned again. Peak set-up memory is
        this rank's partitions plus the largest single parameter."""
        deepspeed = import_deepspeed()
        from bigtrain.model.init import seeded_filler

        config = getattr(meta_model, "cfg", None)
        assert config is not None, "ZeRO-3 set-up rebuilds the model from its config (model.cfg)"
        if not deepspeed.comm.is_initialized():
            # zero.Init reads the world size from DeepSpeed's communication layer, which
            # deepspeed.initialize would set up only later; it adopts the existing process group.
            deepspeed.comm.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                            auto_mpi_discovery=False, verbose=False)
        host_params = self.device.type == "cpu" or self.zero.offload_params
        with _freed_memory_returned(host_params), deepspeed.zero.Init(
                config_dict_or_path=self.ds_config, remote_device="cpu" if self.zero.offload_params else None):
            model: nn.Module = type(meta_model)(config)
        parallelize(model, self.cfg, compile=self.compile)  # act-ckpt (compile is off under stage 3)
        fill = seeded_filler(seed)
        with torch.no_grad(), _freed_memory_returned(host_params):
            for name, param, std in model.init_plan():  # type: ignore[operator]  # a Decoder
                # modifier_rank=0: rank 0's values (every rank computes the same) are partitioned on exit.
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if std is None:
                        nn.init.ones_(param)
                    else:
                        fill(param, std, name)
            model.init_buffers()  # type: ignore[operator]  # a Decoder
        return model

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
        zopt = self.zero_optimizer
        offloaded = self.zero.offload_optimizer or self.zero.offload_params
        if zopt is None or self.compute_dtype != torch.float32 or offloaded:
            return 0
        if self.zero.stage == 3:
            pairs = list(zip(getattr(zopt, "fp16_partitioned_groups_flat", []),
                             getattr(zopt, "fp32_partitioned_groups_flat", []), strict=True))
        else:
            import torch.distributed as tdist

            dp_groups = getattr(zopt, "real_dp_process_group", [])
            pairs = [(groups[tdist.get_rank(group=dp_groups[i])], master) for i, (groups, master) in
                     enumerate(zip(getattr(zopt, "parallel_partitioned_bit16_groups", []),
                                   getattr(zopt, "single_partition_of_fp32_groups", []), strict=True))]
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
    def zero_optimizer(self) -> Any | None:
        """DeepSpeed's ZeRO optimizer wrapper (None at stage 0, where the torch optimizer is used as is)."""
        return self.engine.optimizer if self.engine.zero_optimization() else None

    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW doing the math (on ZeRO's flat fp32 partitions for stages 1-3)."""
        zopt = self.zero_optimizer
        inner: torch.optim.Optimizer = zopt.optimizer if zopt is not None else self.engine.optimizer
        return inner

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
        if self.zero_optimizer is None and not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
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
    # DeepSpeed's own files (bigtrain.checkpoint.deepspeed reads and writes them through the attributes below).
    checkpoint_format = "deepspeed"

    @property
    def param_order(self) -> list[nn.Parameter]:
        """The parameters in bigtrain's optimizer order (index i of a torch optimizer state dict)."""
        return self._order

    @staticmethod
    def full_shape(p: nn.Parameter) -> torch.Size:
        """The unpartitioned shape of a parameter (stage 3 keeps an empty placeholder in ``p``)."""
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def load_model_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Full weights (``model.init_from``, a resume on another world size) into the working and the
        fp32 master partitions."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        module = self.engine.module
        if self.zero_optimizer is None:
            module.load_state_dict(weights)
            return
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

    # -- introspection ---------------------------------------------------------------
    def held_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds: working params (stage 3: its partitions), grads, fp32 masters + AdamW moments."""
        from bigtrain.parallel.memory import _count, _optimizer_tensors

        seen: set[tuple[str, int]] = set()
        module = self.engine.module
        zopt = self.zero_optimizer
        params: list[torch.Tensor] = []
        for p in module.parameters():
            params.append(p)  # stage 3: an empty placeholder (skipped) unless gathered or persistent
            if hasattr(p, "ds_tensor"):
                params.append(p.ds_tensor)
        n_params = _count(params, seen)

        grads: list[torch.Tensor] = [p.grad for p in module.parameters() if p.grad is not None]
        if zopt is not None:
            for attr in ("averaged_gradients", "grad_partitions_flat_buffer",
                         "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
                value = getattr(zopt, attr, None)
                if isinstance(value, torch.Tensor):
                    grads.append(value)
                elif isinstance(value, dict):
                    for v in value.values():
                        grads.extend(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, torch.Tensor))
                elif isinstance(value, list):
                    grads.extend(v for v in value if isinstance(v, torch.Tensor))
            for flat in self._masters():
                if flat.grad is not None:
                    grads.append(flat.grad)
        n_grads = _count(grads, seen)

        inner = self.inner_optimizer()
        n_optim = _count(list(self._masters()) + list(_optimizer_tensors(inner)), seen)
        return {"params": n_params, "grads": n_grads, "optimizer": n_optim, "total": n_params + n_grads + n_optim}

    def _masters(self) -> list[torch.Tensor]:
        """The fp32 master partitions the inner optimizer steps (shared with the params when no copy is needed)."""
        zopt = self.zero_optimizer
        if zopt is None:
            return []
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            value = getattr(zopt, attr, None)
            if value:
                return [t for t in value if isinstance(t, torch.Tensor)]
        return []

    def unwrap(self, model: nn.Module) -> nn.Module:
        module: nn.Module = self.engine.module
        return module

