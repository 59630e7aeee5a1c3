"""Activation checkpointing, compile and sharding, applied to the model from outside in one order.

Every strategy calls :func:`parallelize` on the meta-device model: act-ckpt → fp8 → compile → shard.
The wrappers work in place (a subclass swap, torchao's swap of ``nn.Linear`` for ``Float8Linear``
and ``nn.Module.compile``), so parameter names and state-dict keys never change.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain import messages
from bigtrain.parallel.config import ParallelConfig

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """``cls`` with its forward recomputed in backward (non-reentrant checkpointing)."""
    if cls not in _CHECKPOINTED:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(super(new_cls, self).forward, *args, use_reentrant=False, **kwargs)  # type: ignore[arg-type]  # new_cls is a type (made just below); mypy sees a variable

        new_cls = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _CHECKPOINTED[cls] = new_cls
    return _CHECKPOINTED[cls]


def checkpoint_module(module: nn.Module) -> None:
    """Recompute this module's activations in backward instead of storing them (in place)."""
    if type(module) not in _CHECKPOINTED.values():
        module.__class__ = _checkpointed_class(type(module))


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks (the unit of checkpointing, compiling and sharding)."""
    return list(model.layers.values())  # type: ignore[operator]  # Decoder.layers is a ModuleDict


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """none | full (every block) | every_k (blocks k, 2k, ...); returns how many were wrapped."""
    if mode == "none":
        return 0
    step = 1 if mode == "full" else every
    picked = [b for i, b in enumerate(blocks(model)) if (i + 1) % step == 0]
    for block in picked:
        checkpoint_module(block)
    return len(picked)


def compile_backend(compile: bool | str) -> str:
    """The torch.compile backend a strategy's ``compile`` value names (True: inductor; see :func:`parallelize`)."""
    return "inductor" if compile is True else str(compile)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block in place (repeated blocks share one compiled graph)."""
    for block in blocks(model):
        block.compile(backend=backend)


FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


def fp8_emulated() -> bool:
    """FP8 matmuls run for real only on a CUDA GPU with FP8 tensor cores; elsewhere torchao emulates them."""
    return not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY)


@contextlib.contextmanager
def _quiet_cpu_import() -> Iterator[None]:
    """Without CUDA, torchao logs a warning per CUDA extension it cannot load: expected, so hidden."""
    if torch.cuda.is_available():
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fp8_filter(module: nn.Module, fqn: str) -> bool:
    """Convert the blocks' linears only (the vocabulary projection stays in bf16, as in torchtitan),
    and only those whose sizes FP8 matmuls accept (multiples of 16)."""
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: nn.Module) -> int:
    """Swap the blocks' ``nn.Linear`` layers for torchao ``Float8Linear`` (dynamic tensorwise scaling).

    Works on the meta-device model before sharding. Returns how many layers were converted.
    """
    from bigtrain.errors import UserError

    if torch.cuda.is_available() and fp8_emulated():
        major, minor = torch.cuda.get_device_capability()
        raise UserError(f"model.fp8=true needs a GPU with FP8 tensor cores (compute capability >= 8.9, e.g. H100); "
                        f"this GPU is sm_{major}{minor}. Set model.fp8=false.")
    try:
        with _quiet_cpu_import():
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("model.fp8=true needs torchao: pip install 'bigtrain[fp8]' (or pip install torchao), "
                        "or set model.fp8=false.") from None
    emulate = fp8_emulated()
    if emulate:
        messages.warn("warning: model.fp8: no FP8-capable GPU; torchao emulates FP8 matmuls "
                      "(correct but slow; for tests).")
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate), module_filter_fn=_fp8_filter)
    return before - sum(type(m) is nn.Linear for m in model.modules())


ShardFn = Callable[[nn.Module, bool], None]  # (module, is_root) -> None


def parallelize(model: nn.Module, cfg: ParallelConfig, *, compile: bool | str,
                shard: ShardFn | None = None) -> nn.Module:
    """act-ckpt → fp8 → compile → shard (each block, then the root); returns the same model object.

    ``compile``: False (off), True (inductor) or a torch.compile backend name (``train.compile_backend``).
    FP8 follows ``model.fp8`` of the model's own config (``model.cfg``), so strategies need not pass it.
    """
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.activation_checkpointing_every)
    if getattr(getattr(model, "cfg", None), "fp8", False):
        apply_fp8(model)
    if compile:
        apply_compile(model, compile_backend(compile))
    if shard is not None:
        for block in blocks(model):
            shard(block, False)
        shard(model, True)
    return model
