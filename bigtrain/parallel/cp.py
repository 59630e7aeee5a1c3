"""Context parallelism, Ulysses-style: each rank holds a slice of every sequence; attention trades
sequence for heads by all-to-all.

A forward pre-hook on the decoder cuts the batch: rank ``r`` of the context-parallel group keeps
positions ``[r * S/cp, (r + 1) * S/cp)`` of the tokens, the targets and the rotary positions
(computed from the whole sequence first, so documents that straddle a cut keep their positions);
the document ids stay whole, for the attention mask. Everything but attention is per token, so it
runs on the slice unchanged. Attention (``Attention.attend``, overridden by a subclass swapped in
place) all-to-alls q/k/v from ``[B, H, S/cp, D]`` to ``[B, H/cp, S, D]`` (every rank now sees the
whole sequence for ``H/cp`` heads: causal and document masks work as on one rank), attends, and
all-to-alls the output back. Works on any device and backend with all-to-all (gloo included).

Under pipeline parallelism the schedule, not the decoder's forward, runs training: the strategy cuts
the batch with :func:`slice_sequence` and the positions travel between stages with the activations.

Each rank's loss is the mean over its slice; slices are equal, so the mean over context-parallel
ranks (the trainer's loss average, and FSDP2's gradient average over ``dp_shard_cp``) is the loss
of the whole sequence. Inference (no targets: evaluation, generation) runs the whole sequence on
every rank of the group, without exchanges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.kernels.attention import positions_from_doc_ids
from bigtrain.model.decoder import Attention, Decoder


@dataclass
class ContextParallelState:
    """Shared by the decoder's pre-hook and every attention layer of one model."""

    group: Any
    size: int
    rank: int
    active: bool = False  # this forward is split (training); False for inference


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Exchange the equal chunks of dim 0 (chunk j goes to rank j; row j of the result came from rank j)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous too: the collective reads and writes flat buffers
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """[B, H, S/cp, D] (this rank's positions, every head) -> [B, H/cp, S, D] (every position, this rank's heads)."""
    b, h, s, d = x.shape
    chunks = x.reshape(b, size, h // size, s, d).transpose(0, 1)  # [cp, B, H/cp, S/cp, D]: chunk j goes to rank j
    got = _all_to_all(chunks, group)  # got[j] = rank j's positions of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * s, d)


def _heads_to_seq(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    b, h, s, d = x.shape
    chunks = x.reshape(b, h, size, s // size, d).permute(2, 0, 1, 3, 4)  # [cp, B, H/cp, S/cp, D]
    got = _all_to_all(chunks, group)  # got[j] = my positions of rank j's heads
    return got.transpose(0, 1).reshape(b, size * h, s // size, d)


class _Exchange(torch.autograd.Function):
    """Sequence -> heads (``to_heads``) or back; the gradient takes the inverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: ContextParallelState, to_heads: bool) -> torch.Tensor:
        ctx.state, ctx.to_heads = state, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, state.size, state.group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        inverse = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return inverse(grad, ctx.state.size, ctx.state.group), None, None


class ContextParallelAttention(Attention):
    """Attention whose ``attend`` runs on the whole sequence for ``heads / cp`` heads (class swapped in place)."""

    cp_state: ContextParallelState

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               doc_ids: torch.Tensor | None) -> torch.Tensor:
        state = self.cp_state
        if not state.active:
            return super().attend(q, k, v, doc_ids)
        if k.shape[1] % state.size:
            # Fewer local kv heads than ranks: give every query head its own copy before the exchange.
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q, k, v = (_Exchange.apply(t, state, True) for t in (q, k, v))
        out = super().attend(q, k, v, doc_ids)
        result: torch.Tensor = _Exchange.apply(out, state, False)
        return result


def slice_sequence(state: ContextParallelState, tokens: torch.Tensor, targets: torch.Tensor,
                   doc_ids: torch.Tensor | None, positions: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's slice of a training batch: (tokens, targets, rotary positions), the positions computed
    from the whole sequence first (documents that straddle a cut keep theirs); document ids stay whole."""
    batch, seq = tokens.shape
    piece = seq // state.size
    lo, hi = state.rank * piece, (state.rank + 1) * piece
    if positions is None:
        positions = (positions_from_doc_ids(doc_ids) if doc_ids is not None
                     else torch.arange(seq, device=tokens.device).expand(batch, seq))
    # Contiguous: a pipeline sends them between stages, into buffers laid out like them.
    return tokens[:, lo:hi].contiguous(), targets[:, lo:hi].contiguous(), positions[:, lo:hi].contiguous()


def _split_batch(state: ContextParallelState, module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Decoder forward pre-hook: keep this rank's slice of the sequence (training forwards only)."""
    tokens = args[0]
    targets = args[1] if len(args) > 1 else kwargs.get("targets")
    state.active = targets is not None
    if targets is None:
        return args, kwargs
    tokens, targets, positions = slice_sequence(state, tokens, targets, kwargs.get("doc_ids"),
                                                kwargs.get("positions"))
    kwargs = {**kwargs, "positions": positions}
    kwargs.pop("targets", None)
    return (tokens, targets), kwargs


def apply_context_parallel(model: nn.Module, cp_mesh: Any) -> None:
    """Split sequences over ``cp_mesh`` (see the module docstring); in place, names unchanged."""
    assert isinstance(model, Decoder), type(model)
    state = ContextParallelState(group=cp_mesh.get_group(), size=cp_mesh.size(), rank=cp_mesh.get_local_rank())
    for block in model.layers.values():
        attn = block.get_submodule("attn")
        attn.__class__ = ContextParallelAttention
        assert isinstance(attn, ContextParallelAttention)
        attn.cp_state = state

    def hook(module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _split_batch(state, module, args, kwargs)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    holder: Any = model  # a plain attribute, not a parameter or submodule
    holder.cp_state = state  # a pipeline's training steps bypass the hook: fsdp.py slices for them
