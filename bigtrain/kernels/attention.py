"""Attention: causal ``scaled_dot_product_attention`` and document-masked attention.

* Plain causal attention goes to SDPA, which on CUDA dispatches to the fastest kernel the inputs
  allow (FlashAttention-2, cuDNN, memory-efficient, then math); :func:`sdpa_backend` names the one
  it will pick so the run header can report it.
* Document-masked attention (packed sequences: a token attends only to earlier tokens of its own
  document) uses FlexAttention with a block mask on CUDA when ``torch.nn.attention.flex_attention``
  exists — it skips fully masked tiles, so cost falls with document length — and a boolean-mask SDPA
  reference everywhere else. Both give the same result; only speed differs.
Imports torch only.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

_flex: dict[str, Any] = {}


def sdpa_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The SDPA kernel PyTorch will choose for causal attention on ``device`` with these inputs."""
    if device.type == "cpu":
        return "cpu flash (fused SDPA)" if dtype in (torch.float32, torch.bfloat16, torch.float16) else "math"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "math"
    major, _ = torch.cuda.get_device_capability(device)
    half = dtype in (torch.float16, torch.bfloat16)
    b = torch.backends.cuda
    # Same order and main constraints as PyTorch's own dispatcher (sdp_utils.cpp).
    if b.flash_sdp_enabled() and half and major >= 8 and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    cudnn_on = getattr(b, "cudnn_sdp_enabled", lambda: False)()
    if cudnn_on and half and major >= 9 and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if b.mem_efficient_sdp_enabled() and head_dim % 8 == 0:
        return "efficient"
    return "math"


def flex_available(device: torch.device) -> bool:
    """FlexAttention is used for document masks on CUDA when this torch has it."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def describe(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """One line for the run header."""
    docs = "flex attention (block mask)" if flex_available(device) else "SDPA with a boolean mask (reference)"
    return f"SDPA {sdpa_backend(device, dtype, head_dim)}; document masks: {docs}"


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: 0 at every document start. doc_ids: [B, S] (int).

    Runs on the device without a host sync (a running max over document-start indices).
    """
    seq = doc_ids.shape[1]
    idx = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask: True where query i may attend key j (j <= i and same document)."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal).unsqueeze(1)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, *,
                            compiled: bool = True) -> torch.Tensor:
    """Causal attention within documents through FlexAttention with a block mask (the CUDA path).

    ``compiled=False`` runs torch's eager FlexAttention, which materializes the scores: a
    reference for checking the mask on any device (bench/gpu_check.py --smoke), not for training.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compiled and "fn" not in _flex:
        # Compiled once: eager flex_attention materializes the scores and is only a reference.
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    bsz, _, seq, _ = q.shape
    block_mask = create_block_mask(mask_mod, bsz, None, seq, seq, device=q.device)
    fn: Callable[..., torch.Tensor] = _flex["fn"] if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over q, k, v [B, H, S, D] (k/v already repeated to H heads).

    With ``doc_ids`` [B, S], tokens attend only within their own document.
    """
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if flex_available(q.device):
        return flex_document_attention(q, k, v, doc_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids))
