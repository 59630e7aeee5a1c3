"""Memory planning: how many bytes each rank needs for a config, per parallelism backend.

    plan = plan_memory(load_config("configs/llama3-8b.yaml"), world_size=64, strategy="fsdp")
    plan.total / 2**30   # GiB per rank

The model is built on the meta device (no allocation) and its real parameter shapes are
read, so the numbers follow the code (tied weights, FSDP2's dim-0 padding), not a formula
of the config. Parameters, gradients and optimizer state are what
:func:`bigtrain.parallel.memory.held_state_bytes` measures on a real run (the tests hold the
two within 10% on CPU); communication buffers and activations are estimates.

Mixture-of-Experts models (``model.moe``): state counts *every* parameter (all experts), sharded as
the code shards it: with ``parallel.expert_parallel`` = ep the routed experts are split over ep ranks
(``Shard(0)``) and FSDP2-sharded over the remaining ``dp_shard x cp / ep`` (``parallel/ep.py``), the
rest over ``dp_shard x cp`` as usual, so a rank's share is total / (dp_shard x cp) either way (up to
padding). Activations count what a token routes (see :func:`ffn_activation_bytes`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bigtrain.config import RunConfig
from bigtrain.errors import UserError
from bigtrain.model import ModelConfig, build_on_meta, count_parameters, flops_per_token
from bigtrain.model.moe import GroupedExperts, hidden_dim, is_moe_layer
from bigtrain.optim.muon import muon_parameter_ids
from bigtrain.parallel.mesh import Layout

# Row order of the table: replicated → most sharded.
STRATEGIES: tuple[str, ...] = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
LABELS = {"single": "single", "ddp": "ddp", "fsdp": "fsdp", "zero1": "zero-1", "zero2": "zero-2", "zero3": "zero-3"}
GIB = 2**30
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank needs, by component. ``params + grads + optimizer`` is what a run measures."""

    strategy: str
    world_size: int
    shard_size: int  # ranks parameter/grad/optimizer shards are split over (1 = replicated)
    compute_dtype: str  # dtype of matmuls and activations (fp32 | bf16 | fp16)
    params: int  # parameters held on the device (local shard for sharded backends)
    grads: int  # gradients held between backward and the optimizer step
    optimizer: int  # AdamW moments (2 x fp32) + step counters (Muon matrices: 1 fp32 momentum) + DeepSpeed's master
    buffers: int  # communication buffers: DDP buckets, FSDP/ZeRO-3 gathered (unsharded) layers
    activations: int  # estimate for one micro-batch (micro_batch_size x seq_len tokens)
    host: int = 0  # bytes kept in host memory instead (FSDP cpu_offload, ZeRO offload)
    setup: int = 0  # transient device bytes while the strategy sets up (ZeRO: the whole fp32 model per rank)
    notes: tuple[str, ...] = field(default=())

    @property
    def state(self) -> int:
        """params + grads + optimizer: the part :func:`held_state_bytes` measures."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.buffers + self.activations

    @property
    def peak(self) -> int:
        """The larger of the training-step total and the set-up transient."""
        return max(self.total, self.setup)

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.peak <= gpu_memory_gib * GIB

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer, "buffers": self.buffers,
                "activations": self.activations, "state": self.state, "total": self.total, "setup": self.setup}


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class _Shapes:
    """Parameter shapes of the meta-built model, grouped as FSDP wraps them."""

    all: tuple[tuple[int, ...], ...]  # every distinct parameter (tied counted once)
    expert: tuple[bool, ...]  # for each of ``all``: a routed-expert stack (MoE, [experts, out, in])
    block: tuple[tuple[int, ...], ...]  # the largest Transformer block's parameters (MoE: a MoE block)
    block_experts: int  # elements of that block's routed-expert stacks (0 when dense)
    root: tuple[tuple[int, ...], ...]  # the rest: embedding, final norm, output projection
    muon: tuple[tuple[int, ...], ...]  # the block matrices train.optimizer=muon updates (a subset of ``all``)


@functools.lru_cache(maxsize=8)
def _shapes(mcfg: ModelConfig) -> _Shapes:
    model = build_on_meta(mcfg)
    assert all(p.is_meta for p in model.parameters()), "planning must not allocate parameters"
    in_blocks: set[int] = set()
    blocks = [list(blk.parameters()) for blk in model.layers.values()]
    for params in blocks:
        in_blocks.update(id(p) for p in params)
    largest = max(blocks, key=lambda params: sum(p.numel() for p in params))  # the first of equals: block 0
    experts = {id(p) for mod in model.modules() if isinstance(mod, GroupedExperts) for p in mod.parameters()}
    every = tuple(tuple(p.shape) for p in model.parameters())
    expert = tuple(id(p) in experts for p in model.parameters())
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks)
    hidden = muon_parameter_ids(model)
    muon = tuple(tuple(p.shape) for p in model.parameters() if id(p) in hidden)
    return _Shapes(every, expert, tuple(tuple(p.shape) for p in largest),
                   sum(p.numel() for p in largest if id(p) in experts), root, muon)


def _optimizer_state(shapes: _Shapes, muon: bool, local: Sequence[int],
                     numel: Callable[[tuple[int, ...]], int], weight_bytes: int = 4) -> int:
    """Optimizer state bytes of the parameters held as ``local`` elements each (in the order of ``shapes.all``):
    AdamW keeps two fp32 moments and a step scalar per tensor; with Muon, a block matrix (2-D, never a routed
    expert; held as ``numel(shape)`` elements) keeps one fp32 momentum buffer only. Moments take
    ``weight_bytes`` each (8 under train.precision=fp64); step scalars are fp32 always."""
    fp32 = 4
    adamw = 2 * weight_bytes * sum(local) + fp32 * len(local)
    if not muon:
        return adamw
    return adamw - sum(weight_bytes * numel(s) + fp32 for s in shapes.muon)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _dim0_shard(shape: tuple[int, ...], n: int) -> int:
    """Elements of the largest FSDP2 shard: dim 0 split in ceil(dim0 / n) rows (FSDP2 pads to it)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * _numel(shape[1:])


def expert_shard_numel(shape: tuple[int, ...], ep: int, fsdp: int) -> int:
    """Elements one rank holds of a routed-expert stack ``[experts, out, in]`` on ``fsdp`` = dp_shard x cp (x tp) ranks.

    ep = 1: FSDP2 shards it with its block, on dim 0 (padded: with fewer experts than ranks, one expert's
    worth on every rank). ep > 1 (``parallel/ep.py``): ``experts / ep`` of them on each expert-parallel rank,
    then FSDP2 over the ``fsdp / ep`` others: dim 0 when the local experts split evenly, else dim 1 when it
    does, else dim 0 padded (:func:`bigtrain.parallel.ep.shard_moe`)."""
    if ep == 1:
        return _dim0_shard(shape, fsdp)
    local, rest = shape[0] // ep, shape[1:]
    shard = fsdp // ep
    if local % shard and rest[0] % shard == 0:
        return local * (rest[0] // shard) * _numel(rest[1:])
    return math.ceil(local / shard) * _numel(rest)


# --------------------------------------------------------------------------- activations


def activation_bytes(cfg: RunConfig, compute_bytes: int, residual_bytes: int = 4, ep: int = 1) -> int:
    """Estimated activation memory of one micro-batch (forward saved tensors at the start of backward).

    Per token and block, for this code's Llama block with SDPA (flash / memory-efficient, so no
    seq x seq score matrix is kept), ``a`` = compute bytes, ``h`` = dim, ``f`` = SwiGLU hidden:
      2 RMSNorms: fp32 input + fp32 normalized + output in compute dtype = 2 (8 + a) h
      attention: q, k, v after GQA repeat (saved by SDPA) + SDPA output + wo input = 5 a h
      SwiGLU: w1 out, w3 out, silu(w1 out), their product = 4 a f (a MoE block: :func:`ffn_activation_bytes`)
      QK-norm (``model.qk_norm``): like the block norms, over q (h) and k (kv_heads x head_dim)
    plus the final norm and the loss: fp32 log-softmax of the logits + the logits = (4 + a) V per token.
    Activation checkpointing keeps only each checkpointed block's input (``residual_bytes`` h) and
    recomputes one block at a time in backward. With expert parallelism (``ep`` > 1) the MoE layer in
    flight also holds its all-to-all buffers (:func:`moe_dispatch_bytes`). Not counted: allocator
    fragmentation, temporary gradient buffers of backward, the CUDA context (~0.5-1 GiB), compile workspaces.
    """
    m, p = cfg.model, cfg.parallel
    a = compute_bytes
    per_block = [block_activation_bytes(m, a, i, ep=ep) for i in range(m.num_layers)]
    checkpointed = checkpointed_blocks(p.activation_checkpointing, p.activation_checkpointing_every, m.num_layers)
    per_token = stack_activation_bytes(per_block, checkpointed, residual_bytes * m.dim)
    per_token += moe_dispatch_bytes(m, a, ep) + (8 + a) * m.dim + (4 + a) * m.vocab_size
    return int(per_token) * cfg.train.micro_batch_size * cfg.data.seq_len


def checkpointed_blocks(mode: str, every: int, blocks: int) -> list[bool]:
    """Which of ``blocks`` consecutive blocks activation checkpointing wraps: none, full, or every_k (blocks k,
    2k, ..., counted from 1: :func:`bigtrain.parallel.apply.apply_activation_checkpointing`)."""
    step = {"full": 1, "every_k": every}.get(mode)
    return [step is not None and (i + 1) % step == 0 for i in range(blocks)]


def stack_activation_bytes(per_block: Sequence[float], checkpointed: Sequence[bool], residual: float) -> float:
    """Bytes per token a stack of blocks keeps for backward: each block's saved tensors, or only its input
    (``residual``) when checkpointed, plus the largest checkpointed block, recomputed during backward."""
    kept = sum(b for b, c in zip(per_block, checkpointed, strict=True) if not c)
    recomputed = [b for b, c in zip(per_block, checkpointed, strict=True) if c]
    return kept + residual * len(recomputed) + (max(recomputed) if recomputed else 0)


def block_activation_bytes(m: ModelConfig, compute_bytes: int, index: int, *, tp: int = 1, ep: int = 1) -> float:
    """Saved bytes per token of block ``index`` (:func:`activation_bytes`): norms and attention, then its
    feed-forward; the tensor-parallel parts divided by ``tp`` (plus the sequence-parallel all-gathered input
    of attention and MLP kept whole). A MoE feed-forward is not tensor-sharded: each tensor-parallel rank
    routes its sequence shard, 1 / tp of the tokens, and its input is not gathered."""
    a, h = compute_bytes, m.dim
    dense = 2 * (8 + a) * h + 5 * a * h + qk_norm_bytes(m, a)
    if not is_moe_layer(m, index):
        dense += 4 * a * m.ffn_dim
        return dense / tp + (2 * a * h if tp > 1 else 0)
    return dense / tp + (a * h if tp > 1 else 0) + ffn_activation_bytes(m, a, ep=ep) / tp


def ffn_activation_bytes(m: ModelConfig, compute_bytes: int, *, ep: int = 1) -> int:
    """Saved bytes per token of one MoE feed-forward (``model/moe.py``), ``a`` = compute bytes, ``h`` = dim,
    ``k`` = top_k, ``E`` = num_experts, ``g`` = one expert's hidden size:
      router: fp32 logits and scores (softmax / sigmoid output; the statistics keep both) = 8 E
      routing: top-k weights (fp32) and their normalizing sums + the weight of each routed copy (compute dtype)
        + 3 int64 index vectors (expert ids, sort order, token of each copy) = (28 + a) k + 12; with expert
        parallelism 2 more (the regrouping order and its inverse) = 16 k
      routed copies: the experts' input, their output and the weighted output, k copies of the token = 3 a k h
      expert SwiGLU: w1 out, w3 out, silu, product for each of the k copies = 4 a k g
      shared experts (``num_shared_experts``): a SwiGLU of num_shared x g = 4 a num_shared g
    (checked against the tensors autograd keeps, tests/test_plan.py). Tokens per expert vary with the routing;
    balanced routing (what ``load_balance`` aims at) is assumed, so under expert parallelism a rank receives,
    in expectation, as many routed copies as it sends (k per token)."""
    moe = m.moe
    assert moe is not None
    a, h, k, experts, g = compute_bytes, m.dim, moe.top_k, moe.num_experts, hidden_dim(m)
    routing = (28 + a) * k + 12 + (16 * k if ep > 1 else 0)
    return 8 * experts + routing + 3 * a * k * h + 4 * a * k * g + 4 * a * moe.num_shared_experts * g


def moe_dispatch_bytes(m: ModelConfig, compute_bytes: int, ep: int) -> int:
    """Transient bytes per token of the one MoE layer in flight under expert parallelism (0 when ep = 1 or
    dense): the routed copies sent, the copies received by the all-to-all, the experts' outputs before and
    after they are put back in arrival order for the return all-to-all = 4 a k h (in expectation: balanced
    routing, a rank receives k copies per token of its own)."""
    if m.moe is None or ep == 1:
        return 0
    return 4 * compute_bytes * m.moe.top_k * m.dim


# --------------------------------------------------------------------------- the plan


def qk_norm_bytes(m: ModelConfig, compute_bytes: int) -> int:
    """Activation bytes per token and block that QK-norm adds (0 without it): fp32 input + fp32 normalized +
    output in the compute dtype, for q and k."""
    return (8 + compute_bytes) * (m.dim + m.kv_heads * m.head_dim) if m.qk_norm else 0


def resolve_compute_dtype(precision: str, device: str) -> str:
    """What ``train.precision`` means on ``device``: auto = bf16 on CUDA GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"


def _normalize(strategy: str, cfg: RunConfig) -> str:
    if strategy == "zero":
        stage = cfg.parallel.zero.stage
        return "ddp" if stage == 0 else f"zero{stage}"
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}, zero or all.")
    return strategy


def plan_memory(cfg: RunConfig, world_size: int, strategy: str, *, device: str | None = None,
                ddp_bucket_view: bool = True) -> MemoryPlan:
    """Per-rank bytes for ``cfg`` on ``world_size`` ranks with ``strategy``.

    ``strategy``: single, ddp, fsdp, zero1, zero2, zero3 (or zero = the config's stage).
    ``ddp_bucket_view``: DDP built with ``gradient_as_bucket_view=True`` (bigtrain's DDPStrategy), so the
    gradients are the all-reduce buckets; False adds the buckets as a second gradient copy.
    ``device``: cuda or cpu (default: from run.device, auto = cuda) decides what
    ``train.precision=auto`` means. Raises UserError for a world size that cannot run the
    config (also the global batch not splitting over it, via :meth:`RunConfig.batch_layout`).
    """
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}.")
    if cfg.parallel.model_parallel_degrees:
        keys = ", ".join(f"parallel.{k}={v}" for k, v in cfg.parallel.model_parallel_degrees.items())
        raise UserError(f"bigtrain plan does not model tensor, context or pipeline parallelism yet ({keys}); "
                        f"plan the data-parallel layout (set them to 1) and divide by hand for now.")
    strategy = _normalize(strategy, cfg)
    muon = cfg.train.optimizer == "muon"
    if muon and strategy.startswith("zero"):
        raise UserError(f"{LABELS[strategy]} does not run train.optimizer=muon; plan fsdp or ddp instead.")
    if cfg.model.moe is not None and strategy.startswith("zero"):
        raise UserError(f"{LABELS[strategy]} does not train Mixture-of-Experts models (model.moe); plan fsdp "
                        f"(with parallel.expert_parallel) or ddp instead.")
    if strategy == "single" and world_size != 1:
        raise UserError(f"strategy single runs one process; it cannot plan for {world_size} ranks.")
    cfg.batch_layout(world_size)  # raises ConfigError when the batch does not split
    device = device or ("cpu" if cfg.run.device == "cpu" else "cuda")
    compute = resolve_compute_dtype(cfg.train.precision, device)
    a = _DTYPE_BYTES[compute]
    shapes = _shapes(cfg.model)
    n_all = sum(_numel(s) for s in shapes.all)
    n_block = sum(_numel(s) for s in shapes.block)
    n_root = sum(_numel(s) for s in shapes.root)
    fp32 = 4
    weight = 8 if compute == "fp64" else fp32  # master weights, gradients and moments
    notes: list[str] = []
    host = setup = 0
    buffers = 0
    residual = fp32

    ep = 1  # expert-parallel degree: fsdp only (single and ddp keep every expert on every rank)
    if strategy in ("single", "ddp"):
        shard = 1
        params = grads = weight * n_all  # fp32 master weights (fp64 for fp64); autocast computes in `compute`
        optimizer = _optimizer_state(shapes, muon, [_numel(s) for s in shapes.all], _numel, weight)
        if strategy == "ddp":
            if ddp_bucket_view:  # what bigtrain's DDPStrategy uses
                notes.append(
                    "ddp: gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view): no extra copy"
                )
            else:
                buffers = grads  # the reducer's buckets hold a second copy of every gradient
                notes.append("ddp: gradient buckets = one more fp32 gradient copy (gradient_as_bucket_view=False)")
    elif strategy == "fsdp":
        fcfg = cfg.parallel.fsdp
        if world_size % fcfg.replicate_degree:
            raise UserError(f"parallel.fsdp.replicate_degree={fcfg.replicate_degree} does not divide the world "
                            f"size {world_size}; HSDP needs world_size = replicate_degree x shard group size.")
        shard = world_size // fcfg.replicate_degree
        if cfg.model.moe is not None:
            ep = Layout.from_config(cfg.parallel, world_size).ep  # ConfigError when ep does not divide dp_shard
            if ep > 1:
                experts = cfg.model.moe.num_experts
                notes.append(f"fsdp: expert_parallel={ep}: a rank holds {experts // ep} of the {experts} experts of "
                             f"each MoE layer, FSDP-sharded over {shard // ep} ranks; activations add one layer's "
                             f"all-to-all buffers (balanced routing assumed)")
        # Padded dim-0 shards; routed experts split over ep first, then sharded over the rest.
        local = [expert_shard_numel(s, ep, shard) if is_expert else _dim0_shard(s, shard)
                 for s, is_expert in zip(shapes.all, shapes.expert, strict=True)]
        params = grads = weight * sum(local)  # sharded fp32 (fp64) params; grads reduce-scattered then kept in fp32
        optimizer = _optimizer_state(shapes, muon, local, lambda s: _dim0_shard(s, shard), weight)
        param_dtype = compute if fcfg.param_dtype == "auto" else fcfg.param_dtype
        p = _DTYPE_BYTES[param_dtype]
        residual = p
        # Gathered (unsharded) params: the root unit (embedding, norm, output) stays gathered through
        # forward and backward; a block and the prefetched next one; one block's unsharded grads. With
        # expert parallelism a block's experts unit gathers only this rank's experts / ep.
        gathered = n_block - shapes.block_experts + shapes.block_experts // ep
        buffers = p * n_root + 2 * p * gathered + _DTYPE_BYTES[fcfg.reduce_dtype] * gathered if shard > 1 else 0
        if muon and shard > 1 and shapes.muon:
            # Muon gathers one whole matrix at a time to orthogonalize it: the fp32 gather plus Newton-Schulz
            # workspace (about two more copies) for the largest one.
            buffers += 3 * fp32 * max(_numel(s) for s in shapes.muon)
            notes.append("fsdp + muon: each block matrix is all-gathered whole for Newton-Schulz, one at a time "
                         "(buffers count the largest, 3 fp32 copies)")
        if fcfg.cpu_offload:
            host, params, grads, optimizer = params + grads + optimizer, 0, 0, 0
            notes.append("fsdp: cpu_offload keeps sharded params, grads and optimizer state in host memory")
    else:  # DeepSpeed ZeRO 1/2/3
        stage = int(strategy[-1])
        zcfg = cfg.parallel.zero
        shard = world_size
        p = a  # DeepSpeed casts the module to the training dtype (bf16/fp16 config), fp32 otherwise
        residual = p
        part = math.ceil(n_all / shard)  # flat groups padded to a multiple of the world size
        if stage == 3:
            part = sum(math.ceil(_numel(s) / shard) for s in shapes.all)
            # Parameters under stage3_param_persistence_threshold elements stay whole on every rank
            # (next to their partition): norm gains on big models, most matrices on tiny ones.
            zopt = zcfg.extra.get("zero_optimization", {})
            threshold = int(zopt.get("stage3_param_persistence_threshold", 100_000))
            persistent = sum(_numel(s) for s in shapes.all if _numel(s) < threshold)
            params = p * (part + persistent)
            grads = p * part
            biggest = max(n_block, max(_numel(s) for s in shapes.all))
            buffers = 2 * p * biggest if shard > 1 else 0  # gathered current + prefetched module
        else:
            params = p * n_all
            # Stage 1 reduces gradients to partitions only after backward, so full gradients are held at
            # its end; stage 2 reduce-scatters bucket by bucket during backward.
            grads = p * (part if stage == 2 else n_all)
        # The optimizer steps an fp32 master partition. In bf16/fp16 it is a real extra copy; in an fp32
        # run (not offloaded) ZeroStrategy makes it share storage with the working partition.
        shares_master = compute == "fp32" and not zcfg.offload_optimizer and not zcfg.offload_params
        master = 0 if shares_master else fp32 * part
        optimizer = master + 2 * fp32 * part + fp32 * 2  # moments + a step scalar per flat group
        if stage == 3:
            # Built inside deepspeed.zero.Init (partitioned module by module) and initialized one gathered
            # parameter at a time: the partitions plus the largest parameter, whole.
            setup = params + p * max(_numel(s) for s in shapes.all)
        else:
            # Stages 1/2 hold whole parameters anyway; set-up initializes them in fp32 before DeepSpeed casts.
            setup = fp32 * n_all
            notes.append("zero-1/2: set-up initializes the whole fp32 model on every rank before DeepSpeed casts "
                         "and partitions it; 'fits' counts that")
        if zcfg.offload_optimizer:
            host, optimizer = optimizer, 0
            notes.append("zero: offload_optimizer keeps optimizer state and master weights in host memory")
        if stage == 3 and zcfg.offload_params:
            host, params = host + params, 0
            notes.append("zero: offload_params keeps parameter partitions in host memory")
    return MemoryPlan(strategy=strategy, world_size=world_size, shard_size=shard, compute_dtype=compute,
                      params=params, grads=grads, optimizer=optimizer, buffers=buffers,
                      activations=activation_bytes(cfg, a, residual, ep), host=host, setup=setup,
                      notes=tuple(notes))


# --------------------------------------------------------------------------- report


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(cfg: RunConfig, world_size: int, strategies: Sequence[str], *, device: str,
                gpu_memory_gib: float, source: str = "") -> str:
    """The ``bigtrain plan`` report: header, per-backend table, verdict."""
    strategies = [_normalize(s, cfg) for s in strategies]
    muon = cfg.train.optimizer == "muon"
    moe = cfg.model.moe
    if (muon or moe is not None) and len(strategies) > 1:  # "all": ZeRO refuses Muon and MoE: rows left out, said so
        strategies = [s for s in strategies if not s.startswith("zero")]
    seqs, accum = cfg.batch_layout(world_size)
    rows = [plan_memory(cfg, 1 if s == "single" else world_size, s, device=device) for s in strategies]
    m, t = cfg.model, cfg.train
    n = count_parameters(m)
    shape = (f"{m.num_layers} layers, dim {m.dim}, {m.num_heads} heads / {m.kv_heads} kv, ffn {m.ffn_dim}, "
             f"vocab {m.vocab_size}{', tied' if m.tie_embeddings else ''}")
    model_lines = [f"  model        {_count(n)} params ({shape})"]
    if moe is not None:
        ep = cfg.parallel.expert_parallel
        model_lines = [
            (f"  model        {_count(n)} params total, {_count(count_parameters(m, active=True))} active per token "
             f"({shape})"),
            (f"  experts      {moe.num_experts} routed"
             + (f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else "")
             + f" per MoE layer ({m.num_layers - moe.first_dense_layers} of {m.num_layers} layers), top-{moe.top_k}, "
               f"expert hidden {hidden_dim(m)}"
             + (f"; expert_parallel {ep} ({moe.num_experts // ep} experts per rank, fsdp)" if ep > 1 else "")),
        ]
    compute = rows[0].compute_dtype
    ckpt: str = cfg.parallel.activation_checkpointing
    if ckpt == "every_k":
        ckpt += f" (every {cfg.parallel.activation_checkpointing_every})"
    lines = [
        (f"bigtrain plan: {source or cfg.run.name} on {world_size} rank{'s' if world_size > 1 else ''}"
         f" ({gpu_memory_gib:g} GiB per {'GPU' if device == 'cuda' else 'process'})"),
        *model_lines,
        (f"  compute      {flops_per_token(m, cfg.data.seq_len) / 1e9:.2f} GFLOP/token at seq_len {cfg.data.seq_len}"
         + (" (active parameters)" if moe is not None else "")),
        (f"  batch        {t.global_batch_tokens:,} tokens/step = {seqs} x {cfg.data.seq_len}; micro_batch_size "
         f"{t.micro_batch_size} x {world_size} ranks -> grad accum {accum}"),
        (f"  precision    train.precision={t.precision} -> {compute} compute on {device}"
         f"{' (assumed: --device cpu for fp32)' if t.precision == 'auto' and device == 'cuda' else ''}; "
         f"fp32 master weights; "
         + ("Muon: 1 fp32 momentum per block-matrix element, AdamW (2 fp32 moments) for the rest; ZeRO rows "
            "left out (no Muon)" if muon else "AdamW: 2 fp32 moments per parameter")
         + ("; state counts all parameters (every expert)" if moe is not None else "")
         + ("; ZeRO rows left out (no MoE)" if moe is not None and not muon and len(strategies) > 1 else "")),
        (f"  activations  estimate for one micro-batch ({t.micro_batch_size} x {cfg.data.seq_len} tokens), "
         f"activation_checkpointing={ckpt}"
         + (f"; MoE: top-{moe.top_k} routed copies, expert hidden and router scores per token" if moe else "")),
        "",
    ]
    header = ["backend", "shards", "params", "grads", "optim", "buffers", "activ.", "total GiB", "fits"]
    table = [header]
    for r in rows:
        label = LABELS[r.strategy] + (" (1 rank)" if r.strategy == "single" and world_size != 1 else "")
        table.append([label, str(r.shard_size), _gib(r.params), _gib(r.grads), _gib(r.optimizer), _gib(r.buffers),
                      _gib(r.activations), _gib(r.total), "yes" if r.fits(gpu_memory_gib) else "NO"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        numbers = [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        cells = [row[0].ljust(widths[0]), *numbers, row[-1].ljust(widths[-1])]
        lines.append(("  " + "  ".join(cells)).rstrip())
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("  per rank, GiB. shards = ranks the state is split over; optim = AdamW moments + step counters"
                 " (+ DeepSpeed's fp32 master partition);")
    lines.append("  buffers = DDP gradient buckets / gathered FSDP & ZeRO-3 layers (estimate). Not counted: CUDA"
                 " context, allocator fragmentation.")
    for note in sorted({note for r in rows for note in r.notes}):
        lines.append(f"  note: {note}")
    for r in rows:
        if r.setup > r.total:
            lines.append(f"  note: {LABELS[r.strategy]} needs {_gib(r.setup)} GiB per rank during set-up "
                         f"(more than in training)")
        if r.host:
            lines.append(f"  note: {LABELS[r.strategy]} also needs {_gib(r.host)} GiB of host memory per rank "
                         f"(offload)")
    fits = [LABELS[r.strategy] for r in rows if r.fits(gpu_memory_gib) and r.strategy != "single"]
    misses = [LABELS[r.strategy] for r in rows if not r.fits(gpu_memory_gib) and r.strategy != "single"]
    lines.append("")
    if fits:
        best = min((r for r in rows if r.fits(gpu_memory_gib) and r.strategy != "single"), key=lambda r: r.peak)
        lines.append(f"verdict: fits in {gpu_memory_gib:g} GiB on {world_size} ranks with {', '.join(fits)}"
                     f" (lowest: {LABELS[best.strategy]}, {_gib(best.peak)} GiB/rank)"
                     + (f"; does not fit with {', '.join(misses)}." if misses else "."))
    elif misses:
        best = min(rows, key=lambda r: r.peak)
        lines.append(f"verdict: does NOT fit in {gpu_memory_gib:g} GiB on {world_size} ranks with any of "
                     f"{', '.join(misses)} (lowest: {LABELS[best.strategy]}, {_gib(best.peak)} GiB/rank). "
                     f"Try more ranks, parallel.activation_checkpointing=full, a smaller micro_batch_size or offload.")
    else:  # only the single reference row was asked for
        r = rows[0]
        lines.append(f"verdict: single {'fits' if r.fits(gpu_memory_gib) else 'does NOT fit'} in "
                     f"{gpu_memory_gib:g} GiB ({_gib(r.total)} GiB).")
    return "\n".join(lines) + "\n"

