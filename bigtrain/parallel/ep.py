"""Expert parallelism (``parallel.expert_parallel``): each MoE layer's routed experts split over an
expert-parallel group, tokens moved to their experts' ranks and back by all-to-all.

Applied from outside the model, in the one ordered place (:class:`bigtrain.parallel.fsdp.FSDPStrategy`:
pipeline split → TP → CP → **EP** → act-ckpt → compile → FSDP2), on the meta-device model:

* :func:`apply_expert_parallel` replaces each :class:`~bigtrain.model.moe.GroupedExperts`' stacked
  weights ``w1``/``w3`` [E, hidden, dim] and ``w2`` [E, dim, hidden] by DTensors ``Shard(0)`` over the
  ``ep`` sub-mesh (:attr:`bigtrain.parallel.mesh.ParallelMesh.ep`): a rank holds E / ep consecutive
  experts. Names and global shapes do not change, so DCP checkpoints are layout-independent (a run
  saved with ep 2 resumes with ep 1 and back) and the sharded initializer draws exactly the unsharded
  weights. It installs :class:`AllToAllDispatch` as ``MoE.dispatch``.
* :func:`shard_moe` (called by the FSDP2 strategy before it shards each block) gives every
  ``experts`` module its own ``fully_shard`` over :attr:`~bigtrain.parallel.mesh.ParallelMesh.expert_fsdp`,
  the ranks left after ``ep``, and makes its gradients averages over *all* data-parallel ranks, like
  every other weight's (see :func:`shard_moe`, which also shards MoE layers under tensor parallelism).

The dispatch, per MoE layer and micro-batch (forward; backward runs the same exchanges reversed):

1. the per-expert token counts go to the ranks that hold those experts (``all_to_all_single``, E
   integers per rank);
2. the split sizes are read on the host: **one host-device sync per MoE layer per micro-batch** (and
   once more per layer in backward under activation checkpointing, which recomputes the forward).
   Uneven all-to-all needs its sizes on the host; this is the price of dropless routing;
3. the tokens themselves go by an all-to-all with autograd (``all_to_all_single_autograd``);
4. the received tokens, grouped by source rank, are regrouped by local expert, run through the
   local experts (grouped matmul), put back in arrival order, and returned by the reverse all-to-all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.model.moe import GroupedExperts, moe_layers

if TYPE_CHECKING:
    from bigtrain.parallel.mesh import ParallelMesh

EXPERT_WEIGHTS = ("w1", "w2", "w3")


class AllToAllDispatch:
    """``MoE.dispatch`` under expert parallelism: routed tokens (sorted by global expert id) go to the ranks
    of the ``group`` that hold their experts, are transformed there and come back in the same order.

    Rank ``j`` of the group holds the experts ``[j * E/ep, (j + 1) * E/ep)``.
    """

    def __init__(self, group: Any, num_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        assert num_experts % self.ep == 0, (num_experts, self.ep)  # config validation refuses anything else
        self.num_local = num_experts // self.ep

    def __call__(self, tokens: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
        """tokens [N, dim] sorted by expert; counts [E] tokens per global expert -> outputs [N, dim], same order."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep, num_local = self.ep, self.num_local
        # Row j: this rank's tokens for rank j's experts. After the exchange, row s: rank s's tokens for mine.
        send_counts = counts.view(ep, num_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The one host sync: uneven all-to-all takes its split sizes as Python ints.
        sizes = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep:]
        received = all_to_all_single_autograd(tokens.contiguous(), recv_splits, send_splits, self.group)
        # Received rows come by source rank, then local expert: regroup them by local expert (stable, so
        # each expert sees its tokens in source-rank order), run the experts, undo the regrouping.
        local_ids = torch.arange(num_local, device=counts.device).repeat(ep)
        expert_of_row = local_ids.repeat_interleave(recv_counts.flatten(), output_size=sum(recv_splits))
        order = expert_of_row.argsort(stable=True)
        out = experts(received[order], recv_counts.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back: torch.Tensor = all_to_all_single_autograd(out[inverse].contiguous(), send_splits, recv_splits,
                                                        self.group)
        return back


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward; in backward the gradient times ``grad_scale``, not summed: every rank of
    ``group`` holds a share of one micro-batch's tokens and uses the summed value, and each rank's share gets
    its own gradient (``grad_scale`` undoes an average over the group that follows; 1 when it is a sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad * ctx.grad_scale if ctx.grad_scale != 1 else grad, None, None


class SequenceShardSum:
    """``MoE.split_sum`` when context and/or tensor parallelism split each sequence: the routing sums of
    the shards are added up, so the balancing terms are those of the whole micro-batch on every rank."""

    def __init__(self, group: Any, grad_scale: float) -> None:
        self.group, self.grad_scale = group, grad_scale

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _SumOverGroup.apply(sums, self.group, self.grad_scale)
        return out


def sum_routing_over_sequence_shards(model: nn.Module, mesh: ParallelMesh) -> int:
    """Install :class:`SequenceShardSum` in every MoE layer when context or tensor parallelism splits the
    sequence (each rank routes its shard); returns how many layers got it.

    Gradient scale: the router's gradients are averaged over context-parallel ranks (FSDP2's mean over
    dp_shard x cp, as for every weight, since each rank's loss is its shard's mean) but summed over
    tensor-parallel ones (:func:`shard_moe`). A balancing term is one value per micro-batch, so each rank's
    share of its gradient is scaled by ``cp`` to survive that average.
    """
    layout = mesh.layout
    layers = moe_layers(model)
    if (layout.cp == 1 and layout.tp == 1) or not layers:
        return 0  # (a dense model creates no process group here)
    sequence_sum = SequenceShardSum(mesh.sequence_shards.get_group(), grad_scale=float(layout.cp))
    for _, moe in layers:
        moe.split_sum = sequence_sum
    return len(layers)


def apply_expert_parallel(model: nn.Module, mesh: ParallelMesh) -> int:
    """Keep only this rank's experts in every MoE layer (DTensors ``Shard(0)`` over ``mesh.ep``) and install
    the all-to-all dispatch. Works on the meta-device model; returns the number of MoE layers changed."""
    from torch.distributed.tensor import DTensor, Shard

    ep_mesh = mesh.ep
    assert ep_mesh is not None, "apply_expert_parallel needs a mesh with expert parallelism"
    group = ep_mesh.get_group()
    layers = moe_layers(model)
    for _, moe in layers:
        experts = moe.experts
        num_experts = moe.moe.num_experts
        ep = ep_mesh.size()
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            assert not isinstance(full, DTensor), f"{name} is already distributed"
            local = torch.empty((num_experts // ep, *full.shape[1:]), dtype=full.dtype, device=full.device)
            shared = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                        stride=full.stride())
            setattr(experts, name, nn.Parameter(shared, requires_grad=full.requires_grad))
        moe.dispatch = AllToAllDispatch(group, num_experts)
    return len(layers)


def shard_moe(module: nn.Module, mesh: ParallelMesh, **fully_shard_kwargs: Any) -> int:
    """Give the MoE layers under ``module`` their own FSDP2 groups (before ``module`` itself is sharded, so the
    dense weights' group does not take them). Returns how many MoE layers got one; none without expert and
    tensor parallelism (the block's group holds the whole layer then).

    * Expert-parallel routed experts (DTensors on the ep mesh, which the dense weights' mesh overlaps) are
      sharded over ``mesh.expert_fsdp``: dim 0 (the local experts) when they split evenly over it; else dim 1
      when it does (FSDP2 shards other dims only evenly); else dim 0 unevenly.
    * Under tensor parallelism the rest of the layer (router, shared experts, and the routed experts without
      expert parallelism), whole on every tensor-parallel rank, is sharded over ``mesh.moe_fsdp``, which
      includes the tensor-parallel ranks (parallel/tp.py: each routes its own sequence shard).

    Gradients: each of these ranks' local gradient holds the contributions of different tokens (the ep
    group's, brought by the backward all-to-all; the tensor-parallel rank's sequence shard), so the reduction
    must *sum* and divide by the data-parallel degree (dp_replicate x dp_shard x cp) only, as the dense
    weights' average does: the gradients are then the same mean over all tokens as on one rank.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    layout = mesh.layout
    divide = float(layout.dp_replicate * layout.dp_shard * layout.cp)

    mp_policy = fully_shard_kwargs.get("mp_policy")

    def summed(target: nn.Module, shard_mesh: Any, **kwargs: Any) -> None:
        sharded: Any = fully_shard(target, mesh=shard_mesh, **kwargs, **fully_shard_kwargs)
        shard_ranks = shard_mesh.size(shard_mesh.ndim - 1)
        reduce_dtype = getattr(mp_policy, "reduce_dtype", None) or next(target.parameters()).dtype
        if shard_ranks == 1 and reduce_dtype not in (torch.float32, torch.bfloat16):
            # fp64 (train.precision=fp64): with one shard rank FSDP2 (torch 2.13) divides by the factor twice,
            # once "before the reduction" and once in its copy that replaces the reduce-scatter. Divide by 1
            # there and by the factor in the hook that runs on the reduced gradient (after HSDP's all-reduce).
            sharded.set_gradient_divide_factor(1.0)
            sharded.set_all_reduce_hook(lambda grad: grad.div_(divide))
            return
        sharded.set_gradient_divide_factor(divide)
        # A custom factor is a pre-multiplied sum, which gloo lacks: sum, then divide the shard. (With one
        # shard rank FSDP2 skips the reduce-scatter and divides by the factor itself.)
        sharded.set_force_sum_reduction_for_comms(shard_ranks > 1)

    efsdp = mesh.expert_fsdp
    expert_shards = efsdp.size(efsdp.ndim - 1)  # HSDP: (dp_replicate, dp_shard_mod_ep); the last dim shards

    def expert_placement(param: nn.Parameter) -> Shard:
        local_experts = param.shape[0] // layout.ep
        if local_experts % expert_shards and param.shape[1] % expert_shards == 0:
            return Shard(1)
        return Shard(0)

    count = 0
    for _, moe in moe_layers(module):
        expert_parallel = isinstance(moe.dispatch, AllToAllDispatch)
        if expert_parallel:
            summed(moe.experts, efsdp, shard_placement_fn=expert_placement)
        if layout.tp > 1:
            summed(moe, mesh.moe_fsdp)
        count += expert_parallel or layout.tp > 1
    return count
