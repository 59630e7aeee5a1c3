"""Fused vocabulary projection + cross-entropy that never materializes the [tokens × vocab] logits.

The tokens are processed in chunks. For each chunk the logits ``h_c @ W.T`` are computed in the
input dtype (fp32 accumulation inside the matmul), then one pass per row computes the
log-sum-exp, the row's loss (with optional z-loss) and *overwrites the logits with their
gradient* in place; two more matmuls turn that into the chunk's ``d hidden`` and its
contribution to ``d weight`` (accumulated in fp32). The chunk buffer is then reused, so the
peak extra memory is one chunk of logits plus the fp32 weight gradient, instead of several
full [tokens × vocab] tensors. The gradients are computed during the forward (the backward only
scales them by the incoming gradient), as in Liger-Kernel's fused linear cross-entropy.

The per-row pass is a Triton kernel (:func:`_ce_rows_kernel`, looping over the vocabulary in
blocks, so the vocabulary needs no particular divisibility); :func:`ce_rows_torch` is the same
pass in plain PyTorch, used when Triton is not wanted (and to measure the memory on CPU).
Nothing here calls ``.item()``: the valid-token count stays on the device.
Reference: :func:`bigtrain.kernels.reference.linear_cross_entropy`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bigtrain.kernels.reference import IGNORE_INDEX
from bigtrain.kernels.reference import linear_cross_entropy as reference  # noqa: F401  (the op's reference)

# (logits chunk [C, V], targets [C], ignore_index, z_loss) -> per-row loss [C] fp32;
# overwrites logits with d loss_row / d logits.
RowsFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


MIN_CHUNK_TOKENS = 256


def default_chunk_tokens(tokens: int, dim: int, vocab: int) -> int:
    """Chunk so one chunk of logits is about as large as the whole hidden-state tensor (Liger's rule),
    but at least MIN_CHUNK_TOKENS rows: each chunk re-reads the whole weight three times, so thinner
    chunks turn the matmuls memory-bound."""
    factor = max(1, math.ceil(vocab / dim))
    rule = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / factor)))))
    return min(tokens, max(rule, MIN_CHUNK_TOKENS))


def ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float) -> torch.Tensor:
    """The per-row pass in PyTorch: returns row losses, leaves d loss_row / d logits in ``logits``."""
    lf = logits.float()  # the chunk itself when it is fp32: everything below is then in place
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = lf.gather(1, safe[:, None]).squeeze(1)
    # logsumexp by hand, in place (torch.logsumexp allocates a chunk-sized temporary).
    row_max = lf.amax(dim=-1)
    grad = lf.sub_(row_max[:, None]).exp_()
    sum_exp = grad.sum(dim=-1)
    lse = row_max + sum_exp.log()
    loss = (lse - target_logit + z_loss * lse * lse) * valid
    # softmax * (1 + 2 z lse) - onehot(target): the gradient of lse - x_t + z lse^2.
    grad.mul_(((1.0 + 2.0 * z_loss * lse) / sum_exp)[:, None])
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))
    grad.mul_(valid[:, None])
    if grad is not logits:
        logits.copy_(grad)
    return loss


def _triton_rows_fn(block_vocab: int | None) -> RowsFn:
    """The per-row pass as a Triton kernel (imports Triton)."""
    import triton

    from bigtrain.kernels._ce_triton import ce_rows_kernel
    from bigtrain.kernels.triton_utils import launch_device, row_warps

    def rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float) -> torch.Tensor:
        c, v = logits.shape
        loss = torch.empty(c, dtype=torch.float32, device=logits.device)
        block = block_vocab or min(triton.next_power_of_2(v), 4096)
        with launch_device(logits):
            ce_rows_kernel[(c,)](logits, targets, loss, logits.stride(0), v, ignore_index, float(z_loss), BLOCK_V=block,
                                 num_warps=row_warps(block))
        return loss

    return rows


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean over non-ignored tokens of CE(hidden @ weight.T, targets) + z_loss * lse^2."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, z_loss: float, chunk_tokens: int, rows_fn: RowsFn) -> torch.Tensor:
        tokens, dim = hidden.shape
        vocab = weight.shape[0]
        n_valid = (targets != ignore_index).sum().clamp(min=1).float()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        # fp32 accumulation of the weight gradient across chunks, whatever the weight dtype.
        dw = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device) if need_dw else None
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            h_c = hidden[start:end]
            logits = h_c @ weight.t()  # [C, V], the only vocabulary-sized buffer
            losses[start:end] = rows_fn(logits, targets[start:end], ignore_index, z_loss)
            if dh is not None:
                torch.mm(logits, weight, out=dh[start:end])
            if dw is not None:
                if logits.dtype == torch.float32:
                    dw.addmm_(logits.t(), h_c)
                else:
                    dw.add_(logits.t() @ h_c)
            del logits
        # Kept on ctx (not save_for_backward) so backward can scale them in place and hand them
        # over without a second weight-sized buffer; a second backward through the graph is refused.
        ctx.grads = (dh, dw, n_valid)
        ctx.weight_dtype = weight.dtype
        return losses.sum() / n_valid

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        if ctx.grads is None:
            raise RuntimeError("fused linear_cross_entropy: backward ran twice through the same graph; "
                               "its gradients are computed once in forward (retain_graph is not supported).")
        dh, dw, n_valid = ctx.grads
        ctx.grads = None
        scale = (grad_out / n_valid).float()  # a device scalar: no host sync
        gh = dh.mul_(scale) if dh is not None else None
        gw = dw.mul_(scale).to(ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0, chunk_tokens: int | None = None,
                         block_vocab: int | None = None, use_triton: bool = True) -> torch.Tensor:
    """Fused ``cross_entropy(hidden @ weight.T, targets)`` (mean over non-ignored tokens) + z-loss.

    hidden: [tokens, dim]; weight: [vocab, dim]; targets: [tokens] (``ignore_index`` entries do not
    count). ``chunk_tokens`` defaults to :func:`default_chunk_tokens`; ``block_vocab`` is the Triton
    kernel's vocabulary tile. ``use_triton=False`` runs the same chunked algorithm with torch ops.
    Under autocast, hidden and weight are cast to the autocast dtype first (as ``F.linear`` would be).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    tokens, dim = hidden.shape
    chunk = chunk_tokens or default_chunk_tokens(tokens, dim, weight.shape[0])
    rows_fn = _triton_rows_fn(block_vocab) if use_triton else ce_rows_torch
    with torch.autocast(device_type, enabled=False):
        loss: torch.Tensor = LinearCrossEntropyFunction.apply(
            hidden, weight, targets, ignore_index, float(z_loss), chunk, rows_fn
        )
    return loss
