"""Activation checkpointing, compile and sharding, applied to the model from outside in one order.

Every strategy calls :func:`parallelize` on the meta-device model: act-ckpt → compile → shard.
Both wrappers work in place (a subclass swap and ``nn.Module.compile``), so parameter names and
state-dict keys never change.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.parallel.config import ParallelConfig

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """``cls`` with its forward recomputed in backward (non-reentrant checkpointing)."""
    if cls not in _CHECKPOINTED:
        def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
            return checkpoint(super(new_cls, self).forward, *args, use_reentrant=False, **kwargs)

        new_cls = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _CHECKPOINTED[cls] = new_cls
    return _CHECKPOINTED[cls]


def checkpoint_module(module: nn.Module) -> None:
    """Recompute this module's activations in backward instead of storing them (in place)."""
    if type(module) not in _CHECKPOINTED.values():
        module.__class__ = _checkpointed_class(type(module))


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks (the unit of checkpointing, compiling and sharding)."""
    return list(model.layers.values())  # type: ignore[union-attr, operator]


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """none | full (every block) | every_k (blocks k, 2k, ...); returns how many were wrapped."""
    if mode == "none":
        return 0
    step = 1 if mode == "full" else every
    picked = [b for i, b in enumerate(blocks(model)) if (i + 1) % step == 0]
    for block in picked:
        checkpoint_module(block)
    return len(picked)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (repeated blocks share one compiled graph)."""
    for block in blocks(model):
        block.compile()


ShardFn = Callable[[nn.Module, bool], None]  # (module, is_root) -> None


def parallelize(model: nn.Module, cfg: ParallelConfig, *, compile: bool, shard: ShardFn | None = None) -> nn.Module:
    """act-ckpt → compile → shard (each block, then the root); returns the same model object."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.activation_checkpointing_every)
    if compile:
        apply_compile(model)
    if shard is not None:
        for block in blocks(model):
            shard(block, False)
        shard(model, True)
    return model
