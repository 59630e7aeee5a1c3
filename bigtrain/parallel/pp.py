"""Pipeline parallelism through ``torch.distributed.pipelining``, applied to the pure decoder from outside.

The decoder's blocks are cut into ``pipeline_parallel x pipeline_virtual_stages`` stages of equal
length; pipeline rank ``p`` holds stages ``p, p + pp, p + 2 pp, ...`` (one stage for GPipe and
1F1B, several for the interleaved schedules). Each rank keeps one :class:`Decoder` holding only its
stages' blocks under their original keys (``layers.5`` stays ``layers.5``), the embedding if it
holds the first stage, and the final norm and output projection if it holds the last, so its
state dict is a subset of the unsplit model's: checkpoints stay layout-independent.

Training: the step's micro-batches are concatenated and the schedule splits them again into
``pipeline_microbatches`` pieces (gradient accumulation folds into the pipeline); torch averages
gradients over them. The loss is known on the last stage and shared over the pipeline group.
Inference (evaluation, generation) runs the stages one after another, sends activations point to
point and broadcasts the logits, so ``model(tokens)`` returns the full logits on every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain.kernels.reference import acc_dtype
from bigtrain.model.decoder import Decoder
from bigtrain.parallel.tp import pad_sequence

# parallel.pipeline_schedule -> torch.distributed.pipelining class (multi: several stages per rank). The
# zero-bubble schedule splits each backward into an input-gradient and a later weight-gradient pass; under
# FSDP2 that needs the blocks' gathered parameters kept between forward and backward (fsdp.py: no
# reshard_after_forward): with resharding, the weight pass gave wrong gradients (grad norm 6% off at step 1).
SCHEDULES = {"gpipe": ("ScheduleGPipe", False), "1f1b": ("Schedule1F1B", False),
             "interleaved_1f1b": ("ScheduleInterleaved1F1B", True),
             "interleaved_zb": ("ScheduleInterleavedZeroBubble", True)}


def stage_layers(num_layers: int, num_stages: int) -> list[list[str]]:
    """Block keys of each stage: contiguous, equal ranges (``num_layers`` is a multiple of ``num_stages``)."""
    per = num_layers // num_stages
    return [[str(i) for i in range(s * per, (s + 1) * per)] for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stages pipeline rank ``pp_rank`` holds (loop order, as torch's interleaved schedules expect)."""
    return [pp_rank + v * pp for v in range(virtual)]


class StageModule(nn.Module):
    """One pipeline stage: [embedding] -> its blocks -> [final norm -> output logits].

    Its children are the same module objects as the rank's :class:`PipelineDecoder` (shared, not
    copied), so ``parameters()`` are exactly this stage's and FSDP2 can shard it as a root.
    """

    def __init__(self, model: Decoder, keys: Sequence[str], *, first: bool, last: bool) -> None:
        super().__init__()
        self.embed = model.tok_embeddings if first else None
        self.blocks = nn.ModuleList([model.layers[k] for k in keys])
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.rope: Callable[[], tuple[torch.Tensor, torch.Tensor]] = lambda: (model.rope_cos, model.rope_sin)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Tokens (first stage) or hidden states -> hidden states, or logits (last stage). Rotary positions
        (document masking, or a context-parallel rank's slice of the sequence) and document ids ride along:
        every stage's attention needs them, so a stage returns them with its hidden states and the next
        stage receives them in the same order."""
        h = self.embed(x) if self.embed is not None else x
        cos, sin = self.rope()
        if positions is not None and self.embed is None:
            # torch's pipelining infers a later stage's shapes by running it once on uninitialized receive
            # buffers: keep those garbage positions inside the rotary table (real ones already are).
            positions = positions.clamp(0, cos.shape[0] - 1)
        for block in self.blocks:
            h = block(h, cos, sin, positions, doc_ids)
        if self.norm is not None and self.output is not None:
            logits: torch.Tensor = self.output(self.norm(h))
            return logits
        if positions is None:
            return h
        return (h, positions) if doc_ids is None else (h, positions, doc_ids)


class PipelineDecoder(Decoder):
    """A rank's part of the decoder (class swapped in place by :func:`split_for_pipeline`).

    ``forward`` is inference only: every rank calls it with the same tokens; each runs its stages
    in turn, activations travel point to point, and the last stage's logits are broadcast.
    Training goes through the schedule (:class:`Pipeline`).
    """

    pp_stages: dict[int, StageModule]
    pp_ranks: list[int]  # global rank of each pipeline rank in this rank's pipeline group
    pp_group: Any
    pp_num_stages: int

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if doc_ids is not None and positions is None:
            from bigtrain.kernels.attention import positions_from_doc_ids

            positions = positions_from_doc_ids(doc_ids)
        pp = len(self.pp_ranks)
        me = dist.get_rank()
        batch, seq = tokens.shape
        # Under tensor (sequence) parallelism activations are split along the sequence: pad the end
        # to a multiple of tp (causal attention keeps it invisible) and drop the padded logits.
        tp_mesh = getattr(self, "tp_mesh", None)
        tp = tp_mesh.size() if tp_mesh is not None else 1
        tokens, positions, doc_ids = pad_sequence(tokens, -seq % tp, positions=positions, doc_ids=doc_ids)
        h: torch.Tensor = tokens
        # Activations travel in the accumulation dtype of the weights: fp32, or fp64 under train.precision=fp64.
        act_dtype = acc_dtype(next(self.parameters()))
        for stage in range(self.pp_num_stages):
            owner = self.pp_ranks[stage % pp]
            previous = self.pp_ranks[(stage - 1) % pp]
            if owner != me:
                continue
            if stage > 0 and previous != me:
                h = torch.empty(batch, tokens.shape[1] // tp, self.cfg.dim, device=tokens.device, dtype=act_dtype)
                dist.recv(h, src=previous, group=self.pp_group)
            # Every rank has the positions and document ids (inference sends the same batch to all): only h
            # travels.
            out = self.pp_stages[stage](h, positions, doc_ids)
            h = (out[0] if isinstance(out, tuple) else out).to(act_dtype)
            following = self.pp_ranks[(stage + 1) % pp]
            if stage < self.pp_num_stages - 1 and following != me:
                dist.send(h.contiguous(), dst=following, group=self.pp_group)
        last_owner = self.pp_ranks[(self.pp_num_stages - 1) % pp]
        logits = (h if me == last_owner
                  else torch.empty(batch, tokens.shape[1], self.cfg.vocab_size, device=tokens.device, dtype=act_dtype))
        dist.broadcast(logits, src=last_owner, group=self.pp_group)
        logits = logits[:, :seq]
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (training uses the schedule)


def split_for_pipeline(model: nn.Module, pp_mesh: Any, virtual: int) -> dict[int, StageModule]:
    """Keep only this rank's stages of the meta-device ``model`` (in place); returns them by stage index."""
    assert isinstance(model, Decoder), type(model)
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp * virtual
    keys = stage_layers(model.cfg.num_layers, num_stages)
    mine = stages_of_rank(pp_rank, pp, virtual)
    kept = {k for s in mine for k in keys[s]}
    for key in list(model.layers.keys()):
        if key not in kept:
            del model.layers[key]
    first, last = 0 in mine, num_stages - 1 in mine
    stages = {s: StageModule(model, keys[s], first=s == 0, last=s == num_stages - 1) for s in mine}
    if not first:
        model.tok_embeddings = None  # type: ignore[assignment]  # this rank holds no embedding
    if not last:
        model.norm = None  # type: ignore[assignment]  # nor the head
        model.output = None
    model.__class__ = PipelineDecoder
    assert isinstance(model, PipelineDecoder)
    model.pp_stages = stages
    model.pp_ranks = [int(r) for r in pp_mesh.mesh.tolist()]
    model.pp_group = pp_mesh.get_group()
    model.pp_num_stages = num_stages
    return stages


class Pipeline:
    """The training schedule over this rank's stages (built after the stages are sharded and materialized)."""

    def __init__(self, model: PipelineDecoder, *, schedule: str, num_microbatches: int, device: torch.device,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        import torch.distributed.pipelining as pipelining

        name, multi = SCHEDULES[schedule]
        stages = [pipelining.PipelineStage(module, index, model.pp_num_stages, device, group=model.pp_group)
                  for index, module in sorted(model.pp_stages.items())]
        cls = getattr(pipelining, name)
        self.schedule = cls(stages if multi else stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn)
        self.group = model.pp_group
        self.holds_last = model.pp_num_stages - 1 in model.pp_stages
        self.loss_dtype = acc_dtype(next(model.parameters()))  # every pipeline rank all-reduces the same dtype

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of every microbatch; the mean loss, the same on every pipeline rank."""
        losses: list[torch.Tensor] = []
        # Inputs feed the first stage and targets the last; other stages ignore what they do not hold.
        args = tuple(t for t in (inputs, positions, doc_ids) if t is not None)
        assert positions is not None or doc_ids is None, "document ids come with their positions"
        self.schedule.step(*args, target=targets, losses=losses)
        loss = (torch.stack([x.detach().to(self.loss_dtype) for x in losses]).mean() if self.holds_last
                else torch.zeros((), device=inputs.device, dtype=self.loss_dtype))
        dist.all_reduce(loss, group=self.group)  # only the last stage's is non-zero
        return loss
