"""Tensor parallelism with sequence parallelism, applied to the pure decoder from outside (DTensor).

The plan (Megatron's, as torchtitan applies it with ``parallelize_module``):

* attention q/k/v and SwiGLU gate/up are split column-wise (each rank computes its heads / its
  slice of the hidden layer), the attention output and SwiGLU down projections row-wise, whose
  partial sums are reduce-scattered along the sequence;
* QK-norm's per-head weights (``model.qk_norm``) are replicated; they normalize this rank's heads;
* between blocks the residual stream is sequence-sharded (each tensor-parallel rank holds
  ``seq / tp`` positions), so norms and residual adds run on a slice and activation memory
  shrinks by ``tp``; each block all-gathers the sequence before its attention and its MLP;
* the embedding is split over the vocabulary (row-wise) and the output projection too: the loss
  is computed on vocabulary-sharded logits (:func:`vocab_parallel_cross_entropy`), never
  gathering a ``[tokens, vocab]`` tensor. A tied embedding is the same Shard(0) weight for both;
* a Mixture-of-Experts layer stays whole on every rank and routes the rank's sequence shard (see
  ``moe_plan`` below and docs/moe.md).

Parameter names never change (the plan shards parameters in place and the decoder's class is
swapped for a subclass that only overrides the output head), so checkpoints stay
layout-independent. Inference (evaluation, generation) gathers the logits instead.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain import messages
from bigtrain.kernels.reference import IGNORE_INDEX, acc_dtype
from bigtrain.model.decoder import Decoder, RMSNorm
from bigtrain.model.moe import MoE


def pad_sequence(tokens: torch.Tensor, pad: int, *, positions: torch.Tensor | None,
                 doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inference input padded at the end by ``pad`` positions, so that sequence parallelism can split it:
    padding tokens repeat the last rotary position and belong to no document (-1). Causal attention keeps
    them invisible to the real tokens; the caller drops their logits."""
    if not pad:
        return tokens, positions, doc_ids
    if positions is not None:
        positions = torch.cat([positions, positions[:, -1:].expand(-1, pad)], dim=1)
    if doc_ids is not None:
        doc_ids = F.pad(doc_ids, (0, pad), value=-1)
    return F.pad(tokens, (0, pad)), positions, doc_ids


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (+ z-loss) over logits whose vocabulary is split over a process group.

    Each rank holds ``logits[:, start:start + V/tp]``; three all-reduces of one number per token
    (max, sum of exponentials, the target's logit) give the exact log-sum-exp. The backward is
    local: ``softmax - onehot`` on this rank's columns.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group: Any,
                z_loss: float) -> torch.Tensor:
        lf = logits.to(acc_dtype(logits))
        vocab_local = lf.shape[-1]
        row_max = lf.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (lf - row_max[:, None]).exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_target = targets - vocab_start
        here = (local_target >= 0) & (local_target < vocab_local)
        local_target = local_target.clamp(0, vocab_local - 1)
        target_logit = (lf.gather(1, local_target[:, None]).squeeze(1) - row_max) * here
        dist.all_reduce(target_logit, group=group)
        lse_shifted = sum_exp.log()
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        loss = ((lse_shifted - target_logit) * valid).sum() / count
        lse = lse_shifted + row_max
        if z_loss:
            loss = loss + z_loss * (lse.pow(2) * valid).sum() / count
        ctx.save_for_backward(exp / sum_exp[:, None], local_target, here, valid, lse, count)
        ctx.z_loss, ctx.dtype = z_loss, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_target, here, valid, lse, count = ctx.saved_tensors
        grad = softmax.clone()
        if ctx.z_loss:
            grad = grad * (1 + 2 * ctx.z_loss * lse[:, None])  # d(z * lse^2)/dlogits = 2 z lse softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= here.to(grad.dtype)
        grad = grad * (valid.to(grad.dtype) / count * grad_out)[:, None]
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, group: Any,
                                 z_loss: float = 0.0) -> torch.Tensor:
    """Mean CE of vocabulary-sharded ``logits`` [tokens, V/tp] against global ``targets`` [tokens]."""
    loss: torch.Tensor = _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group, z_loss)
    return loss


class TensorParallelDecoder(Decoder):
    """The decoder after :func:`apply_tensor_parallel` (class swapped in place; parameters keep their names).

    Only the output head changes: the final hidden states arrive sequence-sharded, are gathered
    along the sequence (their gradient is reduce-scattered back), multiplied by this rank's
    vocabulary slice of the output weight, and the loss is computed on those sharded logits.
    """

    tp_mesh: Any

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        # Sequence parallelism splits the sequence evenly over the tensor-parallel ranks. Inference
        # (generation) sends any length: pad the end (causal attention keeps padding invisible to the
        # real tokens) and drop the padded logits. model.max_seq_len is a multiple of tp (checked).
        pad = -tokens.shape[1] % self.tp_mesh.size()
        if not pad or targets is not None:
            return super().forward(tokens, targets, doc_ids=doc_ids, positions=positions)
        seq = tokens.shape[1]
        if positions is None:
            from bigtrain.kernels.attention import positions_from_doc_ids

            positions = (positions_from_doc_ids(doc_ids) if doc_ids is not None
                         else torch.arange(seq, device=tokens.device).expand(tokens.shape[0], seq))
        tokens, positions, doc_ids = pad_sequence(tokens, pad, positions=positions, doc_ids=doc_ids)
        logits = super().forward(tokens, doc_ids=doc_ids, positions=positions)
        return logits[:, :seq]

    def output_head(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        mesh = self.tp_mesh
        # Gather the sequence; the gradient arrives as a partial sum over this rank's vocabulary slice
        # (Partial), so the backward of the gather is a reduce-scatter, not a plain split.
        h_full = DTensor.from_local(h, mesh, [Shard(1)]).redistribute(mesh, [Replicate()]).to_local(
            grad_placements=[Partial()])
        weight = self.output_weight()
        local_weight = weight.to_local() if isinstance(weight, DTensor) else weight
        logits = F.linear(h_full, local_weight)  # [B, S, V / tp]
        if targets is None:
            return DTensor.from_local(logits, mesh, [Shard(2)]).full_tensor()
        vocab_start = mesh.get_local_rank() * local_weight.shape[0]
        return vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), vocab_start=vocab_start,
                                            group=mesh.get_group(), z_loss=self.cfg.z_loss)


def _settle_collective_output(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """The embedding's output as a plain tensor, not the lazily-waited result of its reduce-scatter.

    Under ``train.compile`` that lazy wrapper (``AsyncCollectiveTensor``) would be the first compiled
    block's input, and torch 2.13 then gets the gradient flowing back out of the compiled block wrong:
    measured, tp2 with FSDP2 took a grad norm of 0.766 instead of 0.949 at step 1 (tp2 alone raised in
    DTensor's redistribute backward). Waiting here costs one copy of the rank's [B, S/tp, D] slice.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.clone() if isinstance(out, AsyncCollectiveTensor) else out


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Shard ``model`` (a meta-device :class:`Decoder`) over ``tp_mesh`` in place (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    assert isinstance(model, Decoder), type(model)
    if model.cfg.kernels == "triton":
        # The norms see DTensors under sequence parallelism, which the fused kernel does not take;
        # rotary and SwiGLU see local tensors and keep their Triton kernels.
        messages.say("bigtrain: note: model.kernels=triton with tensor parallelism: RMSNorm uses the torch "
                     "reference op (the norms run on sequence-parallel DTensors); rotary and SwiGLU stay fused.")
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.kernels = "torch"
    # A pipeline stage may lack the embedding, the final norm or the output projection (None).
    root_plan: dict[str, Any] = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel(use_local_output=True)
    if model.output is not None:
        # Shards the weight by vocabulary. The unsplit model only uses the weight (output_head); a
        # pipeline's last stage calls the module, which gathers the sequence and the logits.
        root_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, root_plan)
    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(_settle_collective_output)
    # Block inputs: (x, cos, sin, positions, doc_ids); only x is a sequence-sharded activation.
    attn_in = (Shard(1), None, None, None, None)
    attn_want = (Replicate(), None, None, None, None)
    # QK-norm sees this rank's heads, [B, S, heads / tp, head_dim]: a sequence-parallel style on the heads
    # dim (2) replicates its head_dim weight and makes the weight's gradient a partial sum that DTensor
    # all-reduces over the tensor-parallel ranks, as for the block norms.
    qk_norm_plan: dict[str, Any] = ({"attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                                     "attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)}
                                    if model.cfg.qk_norm else {})
    dense_ffn_plan = {
        "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "ffn.w1": ColwiseParallel(),
        "ffn.w3": ColwiseParallel(),
        "ffn.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    # A MoE layer is not tensor-sharded: routing is per token, so each rank routes its own sequence shard
    # (no gather), with the router, shared and routed experts whole on every rank. Their gradients are then
    # partial sums over the tensor-parallel ranks, which FSDP2 sums, and the balancing terms are summed
    # over the shards (parallel/ep.py: shard_moe, sum_routing_over_sequence_shards).
    moe_plan = {"ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                          use_local_output=True)}
    for block in model.layers.values():
        is_moe = isinstance(block.ffn, MoE)
        parallelize_module(block, tp_mesh, {
            **qk_norm_plan,
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=attn_in, desired_input_layouts=attn_want),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **(moe_plan if is_moe else dense_ffn_plan),
        })
    if type(model) is Decoder:  # a pipeline's part keeps its own class (it pads inference input itself)
        model.__class__ = TensorParallelDecoder
    model.tp_mesh = tp_mesh
