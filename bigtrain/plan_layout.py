"""Planning N-D layouts (FSDP2 x tensor x context x pipeline parallelism): per-rank memory and a step-time estimate.

    plans = rank_layouts(load_config("configs/llama3-405b.yaml"), 1024, Hardware())
    plans[0].layout.describe(), plans[0].peak / 2**30, plans[0].step_s

Memory follows the code: parameter shapes come from the meta-built model, split as
``parallel/tp.py`` splits them (q/k/v/gate/up by rows, output/down by columns, embedding and output
by vocabulary, norms whole), cut into pipeline stages as ``parallel/pp.py`` cuts them, then sharded
on dim 0 over the FSDP group (``dp_shard x cp``). The worst rank is reported (the pipeline's last
stage holds the output projection). Params, grads and optimizer state are what
:func:`bigtrain.parallel.memory.held_state_bytes` measures (the tests hold them within 10%);
activations and buffers are estimates. Mixture-of-Experts models: every expert is counted. MoE layers
are not tensor-sharded: each tensor-parallel rank routes its sequence shard, so they are FSDP-sharded
over ``dp_shard x cp x tp``; with expert parallelism (``Layout.ep``, drawn from those ranks) the
routed experts are split over ep ranks and FSDP-sharded over the other ``dp_shard x cp x tp / ep``
(``parallel/ep.py``); activations count the routed copies, expert hidden units and router scores of
this rank's tokens (:func:`bigtrain.plan.ffn_activation_bytes`).

The step time is a roofline model, stated so it can be argued with:

* compute = training FLOPs of the step on this rank / (peak FLOP/s x ``efficiency``);
* tensor parallelism: per block and microbatch, 2 all-gathers + 2 reduce-scatters of the block's
  activation in forward, as many in backward (and again in an activation-checkpointing
  recompute), each moving (tp - 1) / tp of it, over the intra-node link while tp fits in a node
  (a MoE block: 1 + 1, attention only; its routing sums' all-reduce, 2 E + 3 numbers, is negligible);
* context parallelism: 4 all-to-alls (q, k, v, output) per attention layer in forward, 4 in backward,
  each moving (cp - 1) / cp of the tensor;
* pipeline parallelism: the activation of each microbatch sent forward and its gradient back
  at every stage boundary, and the bubble: the step takes (1 + (pp - 1) / (microbatches x
  virtual stages)) times as long (a third of that bubble for ``interleaved_zb``, whose deferred
  weight-gradient passes fill idle slots: ZB-H1's estimate, Qi et al. 2023);
* expert parallelism (MoE): per MoE layer and microbatch, 2 all-to-alls in forward (tokens to their
  experts, results back), 2 in backward (and 2 more in an activation-checkpointing recompute), each
  moving top_k x dim x tokens / tp x (ep - 1) / ep of this rank's routed copies (balanced routing: a rank
  receives as many as it sends); the per-expert token counts exchanged first are negligible;
* FSDP2: all-gather of the parameters in forward and backward and reduce-scatter of the
  gradients once per step, overlapped with compute (only the excess counts); HSDP adds an
  all-reduce of the gradient shards across replicas. MoE layers are gathered over ``dp_shard x cp x
  tp`` ranks; under expert parallelism the routed experts over their own ``dp_shard x cp x tp / ep``
  ranks, this rank's ``experts / ep`` of them only.

Compute counts a MoE model's *active* parameters (``flops_per_token``); load imbalance between
experts and the grouped matmuls' lower efficiency are not modelled.

The links are inter-node whenever a group spans more than ``gpus_per_node`` consecutive ranks (an
expert-parallel group spans ``ep`` of them: ep is the innermost part of ``dp_shard x cp x tp``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from bigtrain.config import RunConfig
from bigtrain.errors import UserError
from bigtrain.model import ModelConfig, build_on_meta, flops_per_token
from bigtrain.model.moe import is_moe_layer
from bigtrain.optim.muon import is_hidden_matrix
from bigtrain.parallel.mesh import Layout
from bigtrain.plan import (
    GIB,
    block_activation_bytes,
    checkpointed_blocks,
    expert_shard_numel,
    moe_dispatch_bytes,
    resolve_compute_dtype,
    stack_activation_bytes,
)
from bigtrain.sections import ConfigError

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
_COLUMNWISE = ("wq", "wk", "wv", "w1", "w3")  # split by output rows under tensor parallelism
_ROWWISE = ("wo", "w2")  # split by input columns


@dataclass(frozen=True)
class Hardware:
    """What the step-time estimate assumes (defaults: H100 SXM nodes of 8 GPUs, NVLink, 400 Gb/s per GPU)."""

    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16
    efficiency: float = 0.40  # achieved fraction of peak on large matmuls (typical MFU of a tuned run)
    intra_node_gbps: float = 450.0  # GB/s per GPU (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU (InfiniBand 400 Gb/s)
    gpu_memory_gib: float = 80.0


@dataclass(frozen=True)
class LayoutPlan:
    """Per-rank bytes (worst rank) and the estimated step time of one layout."""

    layout: Layout
    microbatches: int  # pipeline microbatches per step (1 without pipeline parallelism: accumulation steps)
    params: int
    grads: int
    optimizer: int
    buffers: int  # gathered FSDP units, pipeline send/receive buffers
    activations: int
    compute_s: float
    tp_s: float
    cp_s: float
    pp_s: float
    fsdp_exposed_s: float
    bubble: float  # fraction of the step the pipeline idles
    ep_s: float = 0.0  # expert-parallel all-to-alls (MoE)

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.state + self.buffers + self.activations

    @property
    def step_s(self) -> float:
        return ((self.compute_s + self.tp_s + self.cp_s + self.ep_s + self.pp_s) * (1 + self.bubble)
                + self.fsdp_exposed_s)

    def mfu(self, hw: Hardware) -> float:
        """Estimated model FLOPs utilization: the assumed matmul efficiency times the share of the step computing."""
        return 0.0 if self.step_s == 0 else hw.efficiency * self.compute_s / self.step_s


@dataclass(frozen=True)
class _Param:
    name: str
    shape: tuple[int, ...]

    @property
    def expert(self) -> bool:
        """A routed-expert stack (MoE: ``ffn.experts.w1`` [experts, hidden, dim]), split over ep ranks."""
        return self.name.rpartition(".")[0].endswith("experts") and len(self.shape) == 3

    @property
    def moe(self) -> bool:
        """Part of a MoE layer (router, routed or shared experts): whole on every tensor-parallel rank."""
        return self.name.startswith(("ffn.router.", "ffn.experts.", "ffn.shared."))


@functools.lru_cache(maxsize=8)
def _params(mcfg: ModelConfig) -> tuple[tuple[tuple[_Param, ...], ...], tuple[_Param, ...]]:
    """(each block's parameters, the others) of the meta-built model, with their names (relative to the block)."""
    model = build_on_meta(mcfg)
    blocks = tuple(tuple(_Param(n, tuple(p.shape)) for n, p in block.named_parameters())
                   for block in model.layers.values())
    root = tuple(_Param(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith("layers."))
    return blocks, root


def _tp_shape(param: _Param, tp: int) -> tuple[int, ...]:
    """The shape one tensor-parallel rank holds."""
    if tp == 1 or len(param.shape) != 2 or param.moe:
        return param.shape
    leaf = param.name.split(".")[-2]
    rows, cols = param.shape
    if leaf in _COLUMNWISE or param.name in ("tok_embeddings.weight", "output.weight"):
        return (math.ceil(rows / tp), cols)
    if leaf in _ROWWISE:
        return (rows, math.ceil(cols / tp))
    return param.shape


def _local_numel(q: _Param, layout: Layout) -> int:
    """Elements of ``q`` (its tensor-parallel shape) one rank holds after FSDP2 (and expert parallelism): dense
    weights over dp_shard x cp; MoE layers over dp_shard x cp x tp, routed experts split over ep first."""
    fsdp = layout.dp_shard * layout.cp
    if q.expert:
        return expert_shard_numel(q.shape, layout.ep, fsdp * layout.tp)
    return _fsdp_numel(q.shape, fsdp * layout.tp if q.moe else fsdp)


def _fsdp_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements of the largest FSDP2 dim-0 shard (padded to ceil(rows / n) rows)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


@dataclass(frozen=True)
class _Stage:
    """The worst rank's parameters, with this rank's tensor-parallel shapes."""

    first: int  # index of its first block
    blocks: tuple[tuple[_Param, ...], ...]
    root: tuple[_Param, ...]  # embedding / final norm / output projection held here

    def numel(self) -> int:
        return sum(math.prod(p.shape) for ps in (*self.blocks, self.root) for p in ps)


def _stage_params(cfg: RunConfig, layout: Layout) -> _Stage:
    """The worst rank's blocks and other parameters: all of them without pipeline stages; else the larger of
    the first stage (its blocks and the embedding) and the last (its blocks, the norm and the output)."""
    blocks, root = _params(cfg.model)

    def tp(params: tuple[_Param, ...]) -> tuple[_Param, ...]:
        return tuple(_Param(p.name, _tp_shape(p, layout.tp)) for p in params)

    if layout.pp == 1:
        return _Stage(0, tuple(tp(b) for b in blocks), tp(root))
    n = len(blocks) // layout.pp
    first = _Stage(0, tuple(tp(b) for b in blocks[:n]),
                   tp(tuple(p for p in root if p.name == "tok_embeddings.weight")))
    last = _Stage(len(blocks) - n, tuple(tp(b) for b in blocks[-n:]),
                  tp(tuple(p for p in root if p.name != "tok_embeddings.weight")))
    return max(first, last, key=_Stage.numel)


def _link(hw: Hardware, span: int) -> float:
    """Bytes/s of a group whose members lie within ``span`` consecutive ranks."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def _layout_config(cfg: RunConfig, layout: Layout) -> RunConfig:
    parallel = dataclasses.replace(
        cfg.parallel, strategy="fsdp", tensor_parallel=layout.tp, context_parallel=layout.cp,
        pipeline_parallel=layout.pp, expert_parallel=layout.ep,
        fsdp=dataclasses.replace(cfg.parallel.fsdp, replicate_degree=layout.dp_replicate))
    return dataclasses.replace(cfg, parallel=parallel)


def check_layout(cfg: RunConfig, layout: Layout) -> tuple[RunConfig, int, int]:
    """The config with ``layout``, its accumulation steps and pipeline microbatches; ConfigError if it cannot run."""
    lcfg = _layout_config(cfg, layout)
    p = lcfg.parallel
    lcfg.check_moe()  # MoE models refuse pipeline parallelism, as a launch does
    p.check_model(lcfg.model, lcfg.data.seq_len)
    p.check_pipeline(lcfg.model)
    Layout.from_config(p, layout.world_size)
    _, accum = lcfg.batch_layout(layout.data_parallel_size)
    return lcfg, accum, p.check_microbatches(accum * lcfg.train.micro_batch_size, accum)


def plan_layout(cfg: RunConfig, layout: Layout, hw: Hardware, *, device: str = "cuda") -> LayoutPlan:
    """Memory and step time of ``cfg`` on ``layout`` (raises ConfigError for a layout the config cannot run)."""
    lcfg, accum, micro = check_layout(cfg, layout)
    m, t, p = lcfg.model, lcfg.train, lcfg.parallel
    a = _BYTES[resolve_compute_dtype(t.precision, device)]
    fsdp, ep = layout.dp_shard * layout.cp, layout.ep
    stage = _stage_params(lcfg, layout)
    here = [param for block in stage.blocks for param in block] + list(stage.root)
    local = sum(_local_numel(q, layout) for q in here)
    w = 8 if t.precision == "fp64" else 4  # fp32 master weights (fp64 under train.precision=fp64)
    params = grads = w * local  # sharded params and gradients
    optimizer = 2 * w * local + 4 * len(here)  # two moments + an fp32 step scalar per tensor
    if t.optimizer == "muon":  # a block matrix keeps one momentum buffer instead
        optimizer -= sum(w * _local_numel(q, layout) + 4 for block in stage.blocks for q in block
                         if is_hidden_matrix(q.name))
    param_bytes = a if p.fsdp.param_dtype == "auto" else _BYTES[p.fsdp.param_dtype]
    # The largest block as gathered: an expert-parallel rank gathers only its experts / ep.
    gathered = [sum(math.prod(q.shape) // (ep if q.expert else 1) for q in block) for block in stage.blocks]
    one_block = max(gathered)
    root_numel = sum(math.prod(q.shape) for q in stage.root)
    # Without resharding after forward (parallel.fsdp.reshard_after_forward=false, and always under the
    # zero-bubble schedule) every block of the stage stays gathered until its backward.
    keeps_gathered = not p.fsdp.reshard_after_forward or (layout.pp > 1 and p.pipeline_schedule == "interleaved_zb")
    in_flight_params = sum(gathered) + one_block if keeps_gathered else 2 * one_block
    buffers = (param_bytes * (root_numel + in_flight_params) + _BYTES[p.fsdp.reduce_dtype] * one_block
               if fsdp > 1 else 0)

    # Activations of one microbatch, per token of this rank's slice, then times what is in flight.
    seqs_per_micro = accum * t.micro_batch_size // micro
    tokens = seqs_per_micro * lcfg.data.seq_len // layout.cp  # tokens of one microbatch on this rank
    h, tp, v = m.dim, layout.tp, m.vocab_size
    indices = range(stage.first, stage.first + len(stage.blocks))
    per_block = [block_activation_bytes(m, a, i, tp=tp, ep=ep) for i in indices]
    checkpointed = checkpointed_blocks(p.activation_checkpointing, p.activation_checkpointing_every, len(per_block))
    per_token = stack_activation_bytes(per_block, checkpointed, param_bytes * h / tp)
    in_flight = 1 if layout.pp == 1 else (micro if p.pipeline_schedule == "gpipe" else min(micro, layout.pp))
    head = ((8 + a) * h / tp + a * h + (4 + a) * v / tp)  # final norm, gathered hidden, vocabulary-sharded logits
    head += moe_dispatch_bytes(m, a, ep) / tp  # the all-to-all buffers of the one MoE layer in flight
    activations = int(tokens * (per_token * in_flight + head))
    virtual = p.pipeline_virtual_stages
    if layout.pp > 1:
        buffers += int(2 * virtual * tokens / tp * h * a)  # send + receive buffers per stage

    # Step time.
    world = layout.world_size
    flops_rank = flops_per_token(m, lcfg.data.seq_len) * t.global_batch_tokens / world
    compute_s = flops_rank / (hw.peak_tflops * 1e12 * hw.efficiency)
    traffic = traffic_bytes(lcfg, layout, device=device)
    tp_s = traffic["tp"] / _link(hw, layout.tp)
    cp_s = traffic["cp"] / _link(hw, layout.cp * layout.tp)
    ep_s = traffic["ep"] / _link(hw, layout.ep)  # ep: the innermost ranks of dp_shard x cp x tp
    pp_s = traffic["pp"] / _link(hw, world)
    fsdp_s = traffic["fsdp"] / _link(hw, fsdp * layout.tp) + traffic["hsdp"] / (hw.inter_node_gbps * 1e9)
    bubble = (layout.pp - 1) / (micro * virtual) if layout.pp > 1 else 0.0
    if p.pipeline_schedule == "interleaved_zb":
        bubble /= 3  # weight-gradient passes fill the idle slots: about a third of 1F1B's (ZB-H1, Qi et al. 2023)
    return LayoutPlan(layout=layout, microbatches=micro, params=params, grads=grads, optimizer=optimizer,
                      buffers=buffers, activations=activations, compute_s=compute_s, tp_s=tp_s, cp_s=cp_s,
                      pp_s=pp_s, fsdp_exposed_s=max(0.0, fsdp_s - compute_s), bubble=bubble, ep_s=ep_s)


def traffic_bytes(cfg: RunConfig, layout: Layout, *, device: str = "cuda") -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by dimension (``tp``, ``cp``, ``ep``, ``pp``, ``fsdp``, ``hsdp``):
    ring collectives and all-to-alls move (n - 1) / n of the tensor per rank (all-reduce twice that); the model in
    the module docstring. bench/comm_volume.py holds this against bytes counted at the collectives."""
    lcfg, accum, micro = check_layout(cfg, layout)
    m, t, p = lcfg.model, lcfg.train, lcfg.parallel
    a = _BYTES[resolve_compute_dtype(t.precision, device)]
    param_bytes = a if p.fsdp.param_dtype == "auto" else _BYTES[p.fsdp.param_dtype]
    tp, cp, pp, virtual = layout.tp, layout.cp, layout.pp, p.pipeline_virtual_stages
    fsdp = layout.dp_shard * layout.cp
    seqs_per_micro = accum * t.micro_batch_size // micro
    tokens = seqs_per_micro * lcfg.data.seq_len // cp  # tokens of one microbatch on this rank
    microbatches = accum * t.micro_batch_size // seqs_per_micro
    blocks_here = m.num_layers // pp
    ckpt = p.activation_checkpointing != "none"
    passes = 3 if ckpt else 2  # forward, backward (+ recompute)
    act = tokens * m.dim * a  # one block's activation (whole, before the sequence-parallel split)
    # Per block: all-gather before attention and MLP, reduce-scatter after, in each pass (MoE: attention only).
    stage = _stage_params(lcfg, layout)
    moe_blocks = sum(is_moe_layer(m, stage.first + i) for i in range(len(stage.blocks)))
    tp_bytes = ((4 * blocks_here - 2 * moe_blocks) * passes * microbatches * act * (tp - 1) / tp if tp > 1
                else 0.0)
    attn = tokens * a * (2 * m.dim + 2 * m.dim * m.kv_heads / m.num_heads) / tp  # q, output, k, v
    cp_bytes = 2 * passes * blocks_here * microbatches * attn * (cp - 1) / cp if cp > 1 else 0.0
    # Every stage boundary carries an activation forward and its gradient back, per microbatch.
    pp_bytes = 2 * (pp * virtual - 1) / pp * microbatches * act / tp if pp > 1 else 0.0
    ep = layout.ep
    ep_bytes = 0.0
    if ep > 1 and m.moe is not None:
        # Per MoE layer and microbatch: tokens out to their experts and results back, in forward, backward and
        # (checkpointed blocks) the recompute; each moves this rank's k routed copies of its tokens (a
        # tensor-parallel rank's: its sequence shard).
        checkpointed = checkpointed_blocks(p.activation_checkpointing, p.activation_checkpointing_every,
                                           len(stage.blocks))
        exchanges = sum(4 + (2 if c else 0) for i, c in enumerate(checkpointed) if is_moe_layer(m, stage.first + i))
        ep_bytes = exchanges * microbatches * tokens / tp * m.moe.top_k * m.dim * a * (ep - 1) / ep
    # All-gather in forward and backward, reduce-scatter of the gradients (fp32 by default), each moving
    # (n - 1) / n of a tensor gathered over n ranks: dense weights over fsdp; MoE layers over fsdp x tp;
    # expert-parallel experts over fsdp x tp / ep, this rank's experts / ep only.
    here = [q for block in stage.blocks for q in block] + list(stage.root)
    expert_numel = sum(math.prod(q.shape) for q in here if q.expert)
    moe_numel = sum(math.prod(q.shape) for q in here if q.moe and not q.expert)
    dense_numel = stage.numel() - expert_numel - moe_numel
    moe_ranks = fsdp * tp
    groups = [(dense_numel, fsdp), (moe_numel, moe_ranks), (expert_numel / ep, moe_ranks // ep)]
    per_param = 2 * param_bytes + _BYTES[p.fsdp.reduce_dtype]
    fsdp_bytes = per_param * sum(numel * (n - 1) / n for numel, n in groups)
    rep = layout.dp_replicate
    shard_numel = sum(numel / n for numel, n in groups)
    hsdp_bytes = 2 * _BYTES[p.fsdp.reduce_dtype] * shard_numel * (rep - 1) / rep if rep > 1 else 0.0
    return {"tp": tp_bytes, "cp": cp_bytes, "ep": ep_bytes, "pp": pp_bytes, "fsdp": fsdp_bytes, "hsdp": hsdp_bytes}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: RunConfig, world_size: int, hw: Hardware) -> list[Layout]:
    """Every layout of ``world_size`` ranks the config can run: tp within a node, cp and pp powers of two or
    divisors, HSDP replicas as in the config; for a MoE model every expert-parallel degree that divides both
    dp_shard x cp x tp and the experts (pipeline parallelism is refused for MoE models)."""
    rep = cfg.parallel.fsdp.replicate_degree
    moe = cfg.model.moe
    found = []
    for tp in _divisors(hw.gpus_per_node):
        for cp in (1, 2, 4, 8, 16):
            for pp in _divisors(cfg.model.num_layers):
                inner = rep * tp * cp * pp
                if world_size % inner:
                    continue
                dp_shard = world_size // inner
                eps = [1] if moe is None else [d for d in _divisors(dp_shard * cp * tp) if moe.num_experts % d == 0]
                for ep in eps:
                    layout = Layout(pp=pp, dp_replicate=rep, dp_shard=dp_shard, cp=cp, tp=tp, ep=ep)
                    try:
                        check_layout(cfg, layout)
                    except ConfigError:
                        continue
                    found.append(layout)
    return found


def rank_layouts(cfg: RunConfig, world_size: int, hw: Hardware, *, device: str = "cuda") -> list[LayoutPlan]:
    """Plans of every candidate layout: those that fit ``hw.gpu_memory_gib`` first, fastest first."""
    plans = [plan_layout(cfg, layout, hw, device=device) for layout in candidate_layouts(cfg, world_size, hw)]
    return sorted(plans, key=lambda pl: (pl.peak > hw.gpu_memory_gib * GIB, pl.step_s))


def _row(plan: LayoutPlan, hw: Hardware, moe: bool) -> list[str]:
    lay = plan.layout
    return [lay.describe(), str(lay.tp), str(lay.cp), str(lay.pp), *([str(lay.ep)] if moe else []),
            str(lay.dp_replicate * lay.dp_shard), f"{plan.state / GIB:.1f}", f"{plan.activations / GIB:.1f}",
            f"{plan.peak / GIB:.1f}", f"{plan.step_s:.2f}", *([f"{plan.ep_s:.2f}"] if moe else []),
            f"{100 * plan.bubble:.0f}%", f"{100 * plan.mfu(hw):.0f}%",
            "yes" if plan.peak <= hw.gpu_memory_gib * GIB else "NO"]


def format_layouts(cfg: RunConfig, world_size: int, hw: Hardware, *, device: str = "cuda", top: int = 8) -> str:
    """The N-D part of ``bigtrain plan``: the config's own layout (if it sets one) and the best candidates."""
    lines = [(f"N-D layouts on {world_size} ranks ({hw.gpus_per_node} per node; estimate: compute at "
              f"{hw.efficiency:.0%} of {hw.peak_tflops:g} TFLOP/s, {hw.intra_node_gbps:g} GB/s in a node, "
              f"{hw.inter_node_gbps:g} GB/s between nodes; see bigtrain/plan_layout.py)")]
    moe = cfg.model.moe is not None
    header = ["layout", "tp", "cp", "pp", *(["ep"] if moe else []), "dp", "state", "activ.", "peak GiB", "step s",
              *(["a2a s"] if moe else []), "bubble", "MFU", "fits"]
    table = [header]
    p = cfg.parallel
    if p.model_parallel_degrees or p.expert_parallel > 1:
        try:
            own = Layout.from_config(p, world_size)
            table.append(_row(plan_layout(cfg, own, hw, device=device), hw, moe))
            table[-1][0] += " (config)"
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    ranked = rank_layouts(cfg, world_size, hw, device=device)
    table += [_row(plan, hw, moe) for plan in ranked[:top]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                      enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    fitting = [pl for pl in ranked if pl.peak <= hw.gpu_memory_gib * GIB]
    if fitting:
        best = fitting[0]
        lay = best.layout
        lines.append(f"suggested: parallel.strategy=fsdp parallel.tensor_parallel={lay.tp} "
                     f"parallel.context_parallel={lay.cp} parallel.pipeline_parallel={lay.pp} "
                     + (f"parallel.expert_parallel={lay.ep} " if moe else "")
                     + f"({best.peak / GIB:.1f} GiB/rank, ~{best.step_s:.2f} s/step, {len(ranked)} layouts considered)")
    else:
        lines.append(f"no layout fits {hw.gpu_memory_gib:g} GiB on {world_size} ranks ({len(ranked)} considered): "
                     f"add ranks, set parallel.activation_checkpointing=full or lower train.micro_batch_size.")
    if moe:
        lines.append("  MoE: state counts every expert (ep splits the routed experts, FSDP2 the rest); compute counts "
                     "active parameters; a2a s = the expert-parallel all-to-alls (4 per MoE layer and microbatch, 6 "
                     "when recomputed), included in step s; balanced routing assumed.")
    return "\n".join(lines) + "\n"
