"""Mixture-of-Experts feed-forward: token-choice top-k routing, dropless, with grouped expert matmuls.

Pure model code (no process groups): a :class:`MoE` replaces a block's SwiGLU :class:`FeedForward`.
Every token goes to exactly ``top_k`` experts (no capacity factor, nothing dropped). Tokens are
sorted by expert so each expert multiplies one contiguous slice:

* ``torch._grouped_mm`` runs all experts in one call from the slice offsets (no host sync) where the
  installed torch has it and the sizes meet its 16-byte alignment rule (under ``torch.compile``: in
  bf16 only, which its shape function requires);
* otherwise a loop over experts splits the sorted tokens (one host read of the per-expert counts).

Both equal :func:`reference_moe`, a per-token loop kept for the tests.

Balancing (``model.moe.load_balance``):

* ``aux_loss`` — the Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (f_e: fraction of routed
  slots that chose expert e, P_e: its mean router probability) over the tokens of a micro-batch,
  weighted by ``aux_loss_weight`` and added to the training loss by the decoder;
* ``bias`` — DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for
  *selection only*, nudged after each optimizer step by ``bias_update_rate`` toward balance
  (:func:`update_router_biases`, the one hook the trainer calls); the bias is a persistent buffer,
  so it is checkpointed with the weights;
* ``none``.

``router_z_loss`` (ST-MoE) adds the mean squared log-sum-exp of the router logits.

Statistics for logging (tokens per expert, auxiliary loss, router entropy) are accumulated on the
device without a host sync and read by :func:`moe_metrics` on log steps only.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.kernels.reference import acc_dtype
from bigtrain.model.config import MoEConfig

if TYPE_CHECKING:
    from bigtrain.model.config import ModelConfig


def hidden_dim(cfg: ModelConfig) -> int:
    """One expert's SwiGLU hidden size."""
    assert cfg.moe is not None
    return cfg.moe.expert_hidden_dim or cfg.ffn_dim


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    return cfg.moe is not None and index >= cfg.moe.first_dense_layers


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def _grouped_ok(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """torch._grouped_mm needs every row stride to be a multiple of 16 bytes and fp32/bf16/fp16 inputs (fp64
    runs, train.precision=fp64, take the loop); under torch.compile bf16 inputs only (its shape function refuses
    other dtypes, though the eager CPU kernel takes fp32)."""
    if x.dtype == torch.float64 or (torch.compiler.is_compiling() and x.dtype != torch.bfloat16):
        return False
    return grouped_mm_available() and all((d * x.element_size()) % 16 == 0 for d in dims)


class Router(nn.Module):
    """Scores every expert for every token and picks the top k."""

    expert_bias: torch.Tensor | None

    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        if moe.load_balance == "bias":
            # fp32 and persistent: part of the model state, checkpointed with the weights.
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (logits [T, E] fp32, scores [T, E] fp32, top-k weights [T, k] fp32, expert ids [T, k]);
        fp64 throughout for an fp64 model (train.precision=fp64)."""
        logits = self.gate(x)
        logits = logits.to(acc_dtype(logits))
        scores = logits.softmax(dim=-1) if self.moe.router == "softmax" else logits.sigmoid()
        select = scores if self.expert_bias is None else scores + self.expert_bias
        indices = select.topk(self.moe.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.moe.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return logits, scores, weights, indices


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights ([E, out, in], nn.Linear's orientation)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, matmul: str = "auto") -> None:
        super().__init__()
        self.matmul = matmul
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.matmul == "loop":
            return False
        ok = _grouped_ok(x, (int(self.w1.shape[1]), int(self.w1.shape[2])))
        if self.matmul == "grouped" and not ok:
            raise RuntimeError("model.moe.expert_matmul=grouped: torch._grouped_mm is missing from this torch, "
                               "the sizes are not multiples of 16 bytes, or torch.compile traces it in a dtype "
                               "other than bf16; use auto or loop")
        return ok

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, dim], sorted by expert; counts [E_local] tokens per expert (sum N) -> [N, dim]."""
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        if self.use_grouped(x):
            offsets = counts.cumsum(0).to(torch.int32)
            gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
            out: torch.Tensor = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
            return out
        chunks = x.split(counts.tolist())  # the loop needs the sizes on the host
        outs = [F.linear(F.silu(F.linear(c, w1[e])) * F.linear(c, w3[e]), w2[e]) for e, c in enumerate(chunks)]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


def _local(param: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a parameter (a DTensor's local shard once FSDP2 has gathered it: full).

    An isinstance check, not duck typing: torch.compile's tracing of ``getattr(param, "to_local")`` on
    an expert-parallel DTensor came out as a plain attribute miss, leaving a DTensor in the matmul."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


class SharedExperts(nn.Module):
    """The always-on experts, fused into one SwiGLU of num_shared * expert_hidden_dim."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y


# A hook that moves routed tokens to the ranks holding their experts and back (expert parallelism).
# (sorted tokens [N, dim], tokens per global expert [E], experts) -> outputs in the same order.
ExpertDispatch = Callable[[torch.Tensor, torch.Tensor, GroupedExperts], torch.Tensor]
# A hook that sums per-rank routing sums over the ranks that split one micro-batch's tokens between them
# (context and tensor parallelism's sequence shards), each rank keeping its share's gradient; see MoE.split_sum.
SplitSum = Callable[[torch.Tensor], torch.Tensor]


class MoE(nn.Module):
    """Routed experts (+ optional shared experts) in place of a dense SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        hidden = hidden_dim(cfg)
        self.router = Router(cfg.dim, cfg.moe)
        self.experts = GroupedExperts(cfg.moe.num_experts, cfg.dim, hidden, cfg.moe.expert_matmul)
        self.shared = SharedExperts(cfg.dim, hidden * cfg.moe.num_shared_experts) if cfg.moe.num_shared_experts \
            else None
        # Expert parallelism installs its all-to-all here (parallel/ep.py); None = all experts are local.
        self.dispatch: ExpertDispatch | None = None
        # Context / tensor parallelism route each rank's sequence shard here and install a sum over the shards
        # (parallel/ep.py), so the balancing terms are those of the whole micro-batch; None = all tokens here.
        self.split_sum: SplitSum | None = None
        # Set by every forward; the decoder adds them to the training loss and the statistics.
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, scores, weights, indices = self.router(tokens)
        num_experts, k = self.moe.num_experts, self.moe.top_k
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token_of_slot = order // k
        counts = torch.bincount(flat, minlength=num_experts)
        routed = tokens[token_of_slot]
        out = self.experts(routed, counts) if self.dispatch is None else self.dispatch(routed, counts, self.experts)
        out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(tokens).index_add_(0, token_of_slot, out.to(tokens.dtype))
        if self.shared is not None:
            y = y + self.shared(tokens)
        self.aux_loss, self.last_stats = self._aux_and_stats(logits, scores, counts)
        return y.view(shape)

    def _aux_and_stats(self, logits: torch.Tensor, scores: torch.Tensor,
                       counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary loss term (already weighted) and detached statistics
        [counts (E), balancing loss, z-loss, router entropy, 1] of the micro-batch.

        Everything is computed from sums over tokens; when the micro-batch's tokens are split over ranks
        (``split_sum``), the sums are added up over them first, so every rank gets the whole micro-batch's
        terms. The sum does not sum gradients in backward: each rank's tokens receive their own share of
        the gradient, and the router's gradients are combined over those ranks by the data-parallel
        reduction afterwards (parallel/ep.py).
        """
        moe = self.moe
        num_experts = moe.num_experts
        probs = scores if moe.router == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        with torch.no_grad():
            entropy_sum = -(probs * probs.clamp_min(1e-20).log()).sum()
        sums = torch.cat([counts.to(probs.dtype), probs.sum(0), torch.logsumexp(logits, dim=-1).square().sum()[None],
                          entropy_sum[None], logits.new_full((1,), float(scores.shape[0]))])
        if self.split_sum is not None:
            sums = self.split_sum(sums)
        prob_sum, z_sum = sums[num_experts:2 * num_experts], sums[2 * num_experts]
        with torch.no_grad():  # counts and token numbers carry no gradient
            counts_all, entropy_sum, tokens = sums[:num_experts], sums[2 * num_experts + 1], sums[-1].clamp_min(1)
            # E * f_e / T: f_e = counts / (T k), and P_e = prob_sum / T below.
            coef = num_experts * counts_all / (tokens * moe.top_k * tokens)
        balance = (coef * prob_sum).sum()
        z = z_sum / tokens
        aux = logits.new_zeros(())
        if moe.load_balance == "aux_loss" and moe.aux_loss_weight:
            aux = aux + moe.aux_loss_weight * balance
        if moe.router_z_loss:
            aux = aux + moe.router_z_loss * z
        stats = torch.cat([counts_all, torch.stack([balance, z, entropy_sum / tokens]), logits.new_ones(1)])
        return aux, stats.detach()


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """A per-token loop over the chosen experts, for the tests (slow, obviously correct)."""
    tokens = x.reshape(-1, x.shape[-1])
    _, _, weights, indices = moe.router(tokens)
    e = moe.experts
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros_like(tokens[t])
        for j in range(indices.shape[1]):
            i = int(indices[t, j])
            h = F.silu(e.w1[i] @ tokens[t]) * (e.w3[i] @ tokens[t])
            acc = acc + weights[t, j].to(tokens.dtype) * (e.w2[i] @ h)
        if moe.shared is not None:
            acc = acc + moe.shared(tokens[t:t + 1])[0]
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


# ----------------------------------------------------------------------------- statistics and the bias hook
class MoEStats:
    """Per-layer statistics accumulated on the device since the last read (no host sync until then)."""

    def __init__(self) -> None:
        self.since_log: dict[str, torch.Tensor] = {}
        self.since_update: dict[str, torch.Tensor] = {}

    def add(self, name: str, stats: torch.Tensor) -> None:
        for store in (self.since_log, self.since_update):
            store[name] = store[name] + stats if name in store else stats.clone()


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer under ``model`` (through DDP/FSDP/DeepSpeed wrappers), with a short name ``layers.N``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            found.append((name[name.find("layers."):].removesuffix(".ffn"), module))
    return found


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over the ranks that see different tokens


def update_router_biases(stats: MoEStats, layers: list[tuple[str, MoE]], reduce: Reduce | None = None,
                         *, apply: bool = True) -> None:
    """After an optimizer step: nudge each ``bias``-balanced router toward balance, then forget the
    step's counts. ``apply=False`` (a skipped step) only forgets. One collective for all layers."""
    biased = [(n, m) for n, m in layers if m.router.expert_bias is not None and n in stats.since_update]
    if apply and biased:
        loads = torch.stack([stats.since_update[n][: m.moe.num_experts] for n, m in biased])
        if reduce is not None:
            loads = reduce(loads)
        nudge = torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
        with torch.no_grad():
            for row, (_, module) in enumerate(biased):
                bias = module.router.expert_bias
                assert bias is not None
                bias.add_(module.moe.bias_update_rate * nudge[row].to(bias.dtype))
    stats.since_update.clear()


def moe_metrics(stats: MoEStats, layers: list[tuple[str, MoE]], reduce: Reduce | None = None) -> dict[str, Any]:
    """Log-step metrics per MoE layer (host values; the only read of the statistics), then reset them:
    ``moe_imbalance/<layer>`` (max / mean tokens per expert), ``moe_aux_loss/<layer>``,
    ``moe_z_loss/<layer>``, ``moe_entropy/<layer>`` (mean router entropy, nats) and
    ``moe_imbalance_max`` (the worst layer)."""
    names = [n for n, _ in layers if n in stats.since_log]
    if not names:
        return {}
    table = torch.stack([stats.since_log[n] for n in names])
    stats.since_log.clear()
    if reduce is not None:
        table = reduce(table)
    table = table.double().cpu()
    record: dict[str, Any] = {}
    worst = 0.0
    for row, name in zip(table, names, strict=True):
        counts, (balance, z, entropy, forwards) = row[:-4], row[-4:].tolist()
        mean = float(counts.mean())
        imbalance = float(counts.max()) / mean if mean > 0 else math.nan
        worst = max(worst, imbalance)
        record[f"moe_imbalance/{name}"] = imbalance
        record[f"moe_aux_loss/{name}"] = balance / forwards
        record[f"moe_z_loss/{name}"] = z / forwards
        record[f"moe_entropy/{name}"] = entropy / forwards
    record["moe_imbalance_max"] = worst
    return record
