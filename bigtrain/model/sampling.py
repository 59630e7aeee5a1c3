"""Sampling text from a decoder: temperature and top-k, one token at a time (no KV cache: for samples, not serving)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from bigtrain.errors import UserError
from bigtrain.model.decoder import Decoder


class TextCodec(Protocol):
    """What sampling needs from a tokenizer (``bigtrain.data.tokenizer.Tokenizer`` is one)."""

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@torch.no_grad()
def generate(model: Decoder, tokenizer: TextCodec, prompt: str, *, max_new_tokens: int = 100,
             temperature: float = 0.8, top_k: int = 50, device: torch.device | str = "cpu",
             seed: int = 0) -> str:
    """Continue ``prompt`` (or a fresh document when empty) and return only the new text."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}.")
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) if prompt else []
    context = [tokenizer.eos_id, *ids]  # EOS marks a document start, as in training
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        x = torch.tensor([context[-window:]], device=device)
        logits = model(x)[0, -1].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits[logits < kth] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        context.append(nxt)
        new.append(nxt)
    model.train(was_training)
    return tokenizer.decode(new)
