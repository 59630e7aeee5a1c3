"""Muon for the Transformer blocks' hidden matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024; "Muon is scalable", Moonlight, Liu et al. 2025) replaces a matrix's update
by the nearest semi-orthogonal matrix of its (Nesterov) momentum, found by five Newton–Schulz
iterations of a quintic polynomial. It applies to the 2-D weights inside the blocks (attention
``wq wk wv wo``, MLP ``w1 w2 w3``). Embeddings, the output projection (tied or not), norm gains and
anything 1-D get AdamW: their gradients are sparse or per-coordinate, which orthogonalization suits badly.

One :class:`torch.optim.Optimizer` holds both kinds as param groups (``use_muon`` True / False), so
the trainer's LR schedule (it writes ``group["lr"]`` each step), ``optimizer.state_dict()`` and
torch.distributed.checkpoint treat it exactly like ``torch.optim.AdamW``.

* **LR transfer** (Moonlight's RMS matching): the orthogonalized update of an ``m x n`` matrix has
  RMS about ``1/sqrt(max(m, n))``; scaling it by ``0.2 * sqrt(max(m, n))`` gives it AdamW's typical
  update RMS (0.2), so ``train.lr`` tuned for AdamW is a sensible Muon learning rate.
* **Weight decay** is decoupled on Muon matrices too (``p *= 1 - lr * weight_decay``), as in Moonlight.
* **AdamW-group learning rate**: ``group["lr"]`` is the scheduled ``train.lr`` in every group; the AdamW
  groups multiply it by their ``lr_ratio`` (``train.muon.adamw_lr / train.lr``, 1 when ``adamw_lr`` is 0),
  so both follow the schedule's shape.
* **Precision**: Newton–Schulz runs in bf16 on CUDA (the iteration is stable in bf16 and tensor cores
  make it cheap) and in fp32 elsewhere (CPU bf16 matmuls are slow and would make CPU parity tests
  meaningless). Momentum and parameters stay in their own dtype (fp32 master weights).
* **Sharded parameters** (FSDP2 / tensor parallelism: DTensors): Newton–Schulz needs the whole
  matrix, so each Muon parameter's momentum is gathered with ``full_tensor()`` (an all-gather over
  the parameter's mesh), orthogonalized redundantly on every rank of that mesh, and the rank keeps
  its own block. Extra memory: one full matrix (plus Newton–Schulz workspace) at a time; extra
  communication: one all-gather of every hidden matrix per step (about what FSDP2's forward
  all-gather moves once). Everything else (momentum, decay, the AdamW half) is elementwise on the
  local shards.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bigtrain.model.decoder import Block

# The standard quintic coefficients (Jordan et al.): fast convergence of singular values to ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# RMS matching (Moonlight): orthogonal update * 0.2 * sqrt(max(fan_in, fan_out)) has AdamW's update RMS.
RMS_MATCH = 0.2
# The block linears Muon owns, by module name inside a Block. A new 2-D block weight must be added here
# knowingly (the grouping test lists them), not slip into Muon by shape alone.
# In MoE blocks Muon owns the shared experts' linears too; the router and the routed experts (3-D
# stacks, one matrix per expert) stay with AdamW (docs/optimizers.md).
HIDDEN_LINEARS = re.compile(r"^(attn\.(wq|wk|wv|wo)|ffn\.(shared\.)?(w1|w2|w3))$")


def is_hidden_matrix(name_in_block: str) -> bool:
    """Whether a parameter name relative to its Block (``attn.wq.weight``) is a matrix Muon updates."""
    module, _, leaf = name_in_block.rpartition(".")
    return leaf == "weight" and HIDDEN_LINEARS.match(module) is not None


def newton_schulz(grad: torch.Tensor, steps: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The quintic Newton–Schulz iteration: approximately ``U V^T`` for ``grad = U S V^T``.

    Singular values land in roughly [0.7, 1.2] after 5 steps (not exactly 1: the coefficients trade
    precision for speed). Runs in ``dtype`` (default: fp64 for fp64 gradients, as train.precision=fp64 asks;
    else bf16 on CUDA, fp32 elsewhere); returns that dtype.
    """
    assert grad.ndim == 2, grad.shape
    if dtype is None and grad.dtype == torch.float64:
        dtype = torch.float64
    elif dtype is None:
        dtype = torch.bfloat16 if grad.device.type == "cuda" else torch.float32
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the short side: X X^T is min(m, n) square
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    out: torch.Tensor = x.mT if tall else x
    return out


def muon_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters Muon updates: the 2-D weights of the block linears (attention q/k/v/o, MLP
    w1/w2/w3), found by module, so wrappers (DDP, compile, checkpointing, FSDP2) do not matter and the
    embedding and output head (tied or not) never qualify."""
    ids: set[int] = set()
    for module in model.modules():
        if not isinstance(module, Block):  # wrappers swap a Block's class for a subclass, in place
            continue
        for name, sub in module.named_modules():
            if HIDDEN_LINEARS.match(name):
                weight = sub.weight
                if len(getattr(weight, "ds_shape", weight.shape)) == 2:
                    ids.add(id(weight))
    # A weight shared with anything outside the blocks (e.g. tied to an embedding) stays with AdamW.
    outside = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if ".layers." not in f".{name}"}
    return ids - outside


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]],
                                                 list[tuple[str, nn.Parameter]]]:
    """(Muon matrices, AdamW matrices with decay, AdamW vectors without decay), each as (name, parameter)."""
    muon_ids = muon_parameter_ids(model)
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in muon_ids:
            muon.append((name, p))
        elif len(getattr(p, "ds_shape", p.shape)) >= 2:
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    return muon, decay, no_decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``t`` (the tensor itself when not a DTensor). Under no_grad, in-place
    changes to it change the DTensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _gather_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose block on this rank is ``local``, laid out like the DTensor ``like`` (an
    all-gather over its mesh); ``local`` itself when ``like`` is a plain tensor."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(local, like.device_mesh, like.placements,  # type: ignore[attr-defined]  # a DTensor (checked above)
                               shape=like.shape, stride=like.stride(), run_check=False)
    return whole.full_tensor()


def _local_block(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The block of ``full`` that this rank holds of the DTensor ``like`` (any placements: FSDP2's dim-0
    shards, tensor-parallel columns or rows, FSDP2's strided sharding over tensor parallelism)."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements)  # type: ignore[attr-defined]  # a DTensor (checked above)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return full[index]


class Muon(torch.optim.Optimizer):
    """Muon on the groups with ``use_muon=True``, AdamW on the others (see the module docstring).

    Muon groups: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_steps``.
    AdamW groups: ``lr``, ``lr_ratio``, ``weight_decay``, ``betas``, ``eps``.
    State: ``momentum_buffer`` per Muon matrix; ``step``, ``exp_avg``, ``exp_avg_sq`` per AdamW tensor.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, lr: float,
                 ns_dtype: torch.dtype | None = None) -> None:
        defaults = {"lr": lr, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
                    "lr_ratio": 1.0, "betas": (0.9, 0.95), "eps": 1e-8, "use_muon": False}
        super().__init__(list(param_groups), defaults)
        self.ns_dtype = ns_dtype  # None: bf16 on CUDA, fp32 elsewhere (see newton_schulz)
        # Host copies of the AdamW half's step counts (by parameter id): reading the ``step`` tensor each
        # step would be a host read per parameter. Filled on first use, forgotten by load_state_dict.
        self._host_steps: dict[int, int] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._host_steps.clear()  # re-read from the loaded ``step`` tensors on the next step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch's stub overloads closure typing
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        # Every rank walks the same parameters in the same order: the gathers below pair up across ranks.
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.mul_(beta).add_(grad)
            update = grad.add(buf, alpha=beta) if group["nesterov"] else buf
            full = _gather_like(update, p.grad)
            ortho = newton_schulz(full, group["ns_steps"], self.ns_dtype)
            fan_out, fan_in = full.shape
            scale = RMS_MATCH * math.sqrt(max(fan_in, fan_out))
            local_p = _local(p)
            local_p.mul_(1.0 - lr * wd)
            local_p.add_(_local_block(ortho, p).to(local_p.dtype), alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """AdamW as torch.optim.AdamW computes it (decoupled decay, bias-corrected moments)."""
        lr = group["lr"] * group["lr_ratio"]
        wd, (beta1, beta2), eps = group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = self._host_steps.get(id(p))
            if step is None:  # first step, or first after a load: the one read of the state tensor
                step = int(state["step"].item())
            step += 1
            self._host_steps[id(p)] = step
            state["step"].fill_(step)
            grad, param = _local(p.grad), _local(p)
            exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            param.mul_(1.0 - lr * wd)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias1 = 1.0 - beta1**step
            bias2_sqrt = math.sqrt(1.0 - beta2**step)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias1)


def build_muon(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
               momentum: float, nesterov: bool, ns_steps: int, adamw_lr: float = 0.0,
               ns_dtype: torch.dtype | None = None) -> Muon:
    """Muon for the block matrices, AdamW (``betas``, ``eps``; ``adamw_lr``, 0 = ``lr``) for the rest."""
    muon, decay, no_decay = split_parameters(model)
    ratio = adamw_lr / lr if adamw_lr > 0 else 1.0
    groups: list[dict[str, Any]] = [
        {"params": [p for _, p in muon], "use_muon": True, "weight_decay": weight_decay, "momentum": momentum,
         "nesterov": nesterov, "ns_steps": ns_steps},
        {"params": [p for _, p in decay], "use_muon": False, "weight_decay": weight_decay, "lr_ratio": ratio,
         "betas": betas, "eps": eps},
        {"params": [p for _, p in no_decay], "use_muon": False, "weight_decay": 0.0, "lr_ratio": ratio,
         "betas": betas, "eps": eps},
    ]
    return Muon([g for g in groups if g["params"]], lr=lr, ns_dtype=ns_dtype)
