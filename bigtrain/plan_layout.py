"""Planning N-D layouts (FSDP2 x tensor x context x pipeline parallelism): per-rank memory and a step-time estimate.

    plans = rank_layouts(load_config("configs/llama3-405b.yaml"), 1024, Hardware())
    plans[0].layout.describe(), plans[0].peak / 2**30, plans[0].step_s

Memory follows the code: parameter shapes come from the meta-built model, split as
``parallel/tp.py`` splits them (q/k/v/gate/up by rows, output/down by columns, embedding and output
by vocabulary, norms whole), cut into pipeline stages as ``parallel/pp.py`` cuts them, then sharded
on dim 0 over the FSDP group (``dp_shard x cp``). The worst rank is reported (the pipeline's last
stage holds the output projection). Params, grads and optimizer state are what
:func:`bigtrain.parallel.memory.held_state_bytes` measures (the tests hold them within 10%);
activations and buffers are estimates.

The step time is a roofline model, stated so it can be argued with:

* compute = training FLOPs of the step on this rank / (peak FLOP/s x ``efficiency``);
* tensor parallelism: per block and microbatch, 2 all-gathers + 2 reduce-scatters of the block's
  activation in forward, as many in backward (and again in an activation-checkpointing
  recompute), each moving (tp - 1) / tp of it, over the intra-node link while tp fits in a node;
* context parallelism: 4 all-to-alls (q, k, v, output) per attention layer in forward, 4 in backward,
  each moving (cp - 1) / cp of the tensor;
* pipeline parallelism: the activation of each microbatch sent forward and its gradient back
  at every stage boundary, and the bubble: the step takes (1 + (pp - 1) / (microbatches x
  virtual stages)) times as long;
* FSDP2: all-gather of the parameters in forward and backward and reduce-scatter of the
  gradients once per step, overlapped with compute (only the excess counts); HSDP adds an
  all-reduce of the gradient shards across replicas.

The links are inter-node whenever a group spans more than ``gpus_per_node`` consecutive ranks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from bigtrain.config import RunConfig
from bigtrain.errors import UserError
from bigtrain.model import ModelConfig, build_on_meta, flops_per_token
from bigtrain.optim.muon import is_hidden_matrix
from bigtrain.parallel.mesh import Layout
from bigtrain.plan import GIB, qk_norm_bytes, resolve_compute_dtype
from bigtrain.sections import ConfigError

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
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

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        return self.state + self.buffers + self.activations

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.tp_s + self.cp_s + self.pp_s) * (1 + self.bubble) + self.fsdp_exposed_s

    def mfu(self, hw: Hardware) -> float:
        """Estimated model FLOPs utilization: the assumed matmul efficiency times the share of the step computing."""
        return 0.0 if self.step_s == 0 else hw.efficiency * self.compute_s / self.step_s


@dataclass(frozen=True)
class _Param:
    name: str
    shape: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def _params(mcfg: ModelConfig) -> tuple[tuple[_Param, ...], tuple[_Param, ...]]:
    """(one block's parameters, the others) of the meta-built model, with their names (relative to the block)."""
    model = build_on_meta(mcfg)
    block = tuple(_Param(n, tuple(p.shape)) for n, p in model.layers["0"].named_parameters())
    root = tuple(_Param(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith("layers."))
    return block, root


def _tp_shape(param: _Param, tp: int) -> tuple[int, ...]:
    """The shape one tensor-parallel rank holds."""
    if tp == 1 or len(param.shape) < 2:
        return param.shape
    leaf = param.name.split(".")[-2]
    rows, cols = param.shape
    if leaf in _COLUMNWISE or param.name in ("tok_embeddings.weight", "output.weight"):
        return (math.ceil(rows / tp), cols)
    if leaf in _ROWWISE:
        return (rows, math.ceil(cols / tp))
    return param.shape


def _fsdp_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements of the largest FSDP2 dim-0 shard (padded to ceil(rows / n) rows)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


def _stage_params(cfg: RunConfig, layout: Layout) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Tensor-parallel shapes of one block's parameters and of the worst rank's other parameters (all of them
    without pipeline stages; else the larger of the first stage's embedding and the last stage's norm + output)."""
    block, root = _params(cfg.model)
    root_here = list(root)
    if layout.pp > 1:
        first = [p for p in root if p.name == "tok_embeddings.weight"]
        last = [p for p in root if p.name != "tok_embeddings.weight"]
        root_here = max(first, last, key=lambda ps: sum(math.prod(p.shape) for p in ps))
    return [_tp_shape(p, layout.tp) for p in block], [_tp_shape(p, layout.tp) for p in root_here]


def _link(hw: Hardware, span: int) -> float:
    """Bytes/s of a group whose members lie within ``span`` consecutive ranks."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def _layout_config(cfg: RunConfig, layout: Layout) -> RunConfig:
    parallel = dataclasses.replace(
        cfg.parallel, strategy="fsdp", tensor_parallel=layout.tp, context_parallel=layout.cp,
        pipeline_parallel=layout.pp, fsdp=dataclasses.replace(cfg.parallel.fsdp, replicate_degree=layout.dp_replicate))
    return dataclasses.replace(cfg, parallel=parallel)


def check_layout(cfg: RunConfig, layout: Layout) -> tuple[RunConfig, int, int]:
    """The config with ``layout``, its accumulation steps and pipeline microbatches; ConfigError if it cannot run."""
    lcfg = _layout_config(cfg, layout)
    p = lcfg.parallel
    p.check_model(lcfg.model, lcfg.data.seq_len)
    p.check_pipeline(lcfg.model, lcfg.data.document_ids)
    Layout.from_config(p, layout.world_size)
    _, accum = lcfg.batch_layout(layout.data_parallel_size)
    return lcfg, accum, p.check_microbatches(accum * lcfg.train.micro_batch_size, accum)


def plan_layout(cfg: RunConfig, layout: Layout, hw: Hardware, *, device: str = "cuda") -> LayoutPlan:
    """Memory and step time of ``cfg`` on ``layout`` (raises ConfigError for a layout the config cannot run)."""
    lcfg, accum, micro = check_layout(cfg, layout)
    m, t, p = lcfg.model, lcfg.train, lcfg.parallel
    a = _BYTES[resolve_compute_dtype(t.precision, device)]
    fsdp = layout.dp_shard * layout.cp
    one_block_shapes, root_shapes = _stage_params(lcfg, layout)
    blocks_here = m.num_layers // layout.pp
    shapes = one_block_shapes * blocks_here + root_shapes
    local = sum(_fsdp_numel(s, fsdp) for s in shapes)
    params = grads = 4 * local  # fp32 sharded params and gradients
    optimizer = 8 * local + 4 * len(shapes)  # two fp32 moments + a step scalar per tensor
    if t.optimizer == "muon":  # a block matrix keeps one fp32 momentum buffer instead
        block, _ = _params(m)
        hidden = [s for s, param in zip(one_block_shapes, block, strict=True) if is_hidden_matrix(param.name)]
        optimizer -= blocks_here * sum(4 * _fsdp_numel(s, fsdp) + 4 for s in hidden)
    param_bytes = a if p.fsdp.param_dtype == "auto" else _BYTES[p.fsdp.param_dtype]
    one_block = sum(math.prod(s) for s in one_block_shapes)
    root_numel = sum(math.prod(s) for s in root_shapes)
    buffers = (param_bytes * (root_numel + 2 * one_block) + _BYTES[p.fsdp.reduce_dtype] * one_block
               if fsdp > 1 else 0)

    # Activations of one microbatch, per token of this rank's slice, then times what is in flight.
    seqs_per_micro = accum * t.micro_batch_size // micro
    tokens = seqs_per_micro * lcfg.data.seq_len // layout.cp  # tokens of one microbatch on this rank
    h, f, tp, v = m.dim, m.ffn_dim, layout.tp, m.vocab_size
    per_block = (2 * (8 + a) * h + 5 * a * h + 4 * a * f + qk_norm_bytes(m, a)) / tp + (2 * a * h if tp > 1 else 0)
    ckpt = {"full": blocks_here, "every_k": blocks_here // p.activation_checkpointing_every}.get(
        p.activation_checkpointing, 0)
    per_token = (blocks_here - ckpt) * per_block + ckpt * param_bytes * h / tp + (per_block if ckpt else 0)
    in_flight = 1 if layout.pp == 1 else (micro if p.pipeline_schedule == "gpipe" else min(micro, layout.pp))
    head = ((8 + a) * h / tp + a * h + (4 + a) * v / tp)  # final norm, gathered hidden, vocabulary-sharded logits
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
    pp_s = traffic["pp"] / _link(hw, world)
    fsdp_s = traffic["fsdp"] / _link(hw, fsdp * layout.tp) + traffic["hsdp"] / (hw.inter_node_gbps * 1e9)
    bubble = (layout.pp - 1) / (micro * virtual) if layout.pp > 1 else 0.0
    return LayoutPlan(layout=layout, microbatches=micro, params=params, grads=grads, optimizer=optimizer,
                      buffers=buffers, activations=activations, compute_s=compute_s, tp_s=tp_s, cp_s=cp_s,
                      pp_s=pp_s, fsdp_exposed_s=max(0.0, fsdp_s - compute_s), bubble=bubble)


def traffic_bytes(cfg: RunConfig, layout: Layout, *, device: str = "cuda") -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by dimension (``tp``, ``cp``, ``pp``, ``fsdp``, ``hsdp``): ring
    collectives move (n - 1) / n of the tensor per rank (all-reduce twice that); the model in the module docstring.
    bench/comm_volume.py holds this against bytes counted at the collectives."""
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
    # Per block: all-gather before attention and MLP, reduce-scatter after, in each pass.
    tp_bytes = 4 * passes * blocks_here * microbatches * act * (tp - 1) / tp if tp > 1 else 0.0
    attn = tokens * a * (2 * m.dim + 2 * m.dim * m.kv_heads / m.num_heads) / tp  # q, output, k, v
    cp_bytes = 2 * passes * blocks_here * microbatches * attn * (cp - 1) / cp if cp > 1 else 0.0
    # Every stage boundary carries an activation forward and its gradient back, per microbatch.
    pp_bytes = 2 * (pp * virtual - 1) / pp * microbatches * act / tp if pp > 1 else 0.0
    one_block, root = _stage_params(lcfg, layout)
    stage_numel = sum(math.prod(s) for s in one_block) * blocks_here + sum(math.prod(s) for s in root)
    # All-gather in forward and backward, reduce-scatter of the gradients (fp32 by default).
    per_param = 2 * param_bytes + _BYTES[p.fsdp.reduce_dtype]
    fsdp_bytes = per_param * stage_numel * (fsdp - 1) / fsdp if fsdp > 1 else 0.0
    rep = layout.dp_replicate
    hsdp_bytes = 2 * _BYTES[p.fsdp.reduce_dtype] * stage_numel / fsdp * (rep - 1) / rep if rep > 1 else 0.0
    return {"tp": tp_bytes, "cp": cp_bytes, "pp": pp_bytes, "fsdp": fsdp_bytes, "hsdp": hsdp_bytes}


def candidate_layouts(cfg: RunConfig, world_size: int, hw: Hardware) -> list[Layout]:
    """Every layout of ``world_size`` ranks the config can run: tp within a node, cp and pp powers of two or
    divisors, HSDP replicas as in the config."""
    rep = cfg.parallel.fsdp.replicate_degree
    found = []
    for tp in (d for d in range(1, hw.gpus_per_node + 1) if hw.gpus_per_node % d == 0):
        for cp in (1, 2, 4, 8, 16):
            for pp in (d for d in range(1, cfg.model.num_layers + 1) if cfg.model.num_layers % d == 0):
                inner = rep * tp * cp * pp
                if world_size % inner:
                    continue
                layout = Layout(pp=pp, dp_replicate=rep, dp_shard=world_size // inner, cp=cp, tp=tp)
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


def _row(plan: LayoutPlan, hw: Hardware) -> list[str]:
    lay = plan.layout
    return [lay.describe(), str(lay.tp), str(lay.cp), str(lay.pp), str(lay.dp_replicate * lay.dp_shard),
            f"{plan.state / GIB:.1f}", f"{plan.activations / GIB:.1f}", f"{plan.peak / GIB:.1f}",
            f"{plan.step_s:.2f}", f"{100 * plan.bubble:.0f}%", f"{100 * plan.mfu(hw):.0f}%",
            "yes" if plan.peak <= hw.gpu_memory_gib * GIB else "NO"]


def format_layouts(cfg: RunConfig, world_size: int, hw: Hardware, *, device: str = "cuda", top: int = 8) -> str:
    """The N-D part of ``bigtrain plan``: the config's own layout (if it sets one) and the best candidates."""
    lines = [(f"N-D layouts on {world_size} ranks ({hw.gpus_per_node} per node; estimate: compute at "
              f"{hw.efficiency:.0%} of {hw.peak_tflops:g} TFLOP/s, {hw.intra_node_gbps:g} GB/s in a node, "
              f"{hw.inter_node_gbps:g} GB/s between nodes; see bigtrain/plan_layout.py)")]
    header = ["layout", "tp", "cp", "pp", "dp", "state", "activ.", "peak GiB", "step s", "bubble", "MFU", "fits"]
    table = [header]
    p = cfg.parallel
    if p.model_parallel_degrees:
        own = Layout.from_config(p, world_size)
        try:
            table.append(_row(plan_layout(cfg, own, hw, device=device), hw))
            table[-1][0] += " (config)"
        except ConfigError as exc:
            raise UserError(str(exc)) from None
    ranked = rank_layouts(cfg, world_size, hw, device=device)
    table += [_row(plan, hw) for plan in ranked[:top]]
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
                     f"({best.peak / GIB:.1f} GiB/rank, ~{best.step_s:.2f} s/step, {len(ranked)} layouts considered)")
    else:
        lines.append(f"no layout fits {hw.gpu_memory_gib:g} GiB on {world_size} ranks ({len(ranked)} considered): "
                     f"add ranks, set parallel.activation_checkpointing=full or lower train.micro_batch_size.")
    return "\n".join(lines) + "\n"
