"""Sampling text from a trained model (temperature and top-k), and loading one from a run folder."""
from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.model import Decoder


@torch.no_grad()
def generate(model: Decoder, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 100,
             temperature: float = 0.8, top_k: int = 50, device: torch.device | str = "cpu",
             seed: int = 0) -> str:
    """Continue ``prompt`` (or a fresh document when empty) and return only the new text."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}.")
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) if prompt else []
    context = [tokenizer.eos_id] + ids  # EOS marks a document start, as in training
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


def load_for_generation(run_dir: str | Path, device: str = "cpu") -> tuple[Decoder, Tokenizer]:
    """Model (latest checkpoint of a run folder, or a checkpoint folder) and its tokenizer."""
    from bigtrain.checkpoint.manager import load_state, resolve_resume
    from bigtrain.config import config_from_dict
    from bigtrain.model import build_on_meta

    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run folder (run.out_dir) or a checkpoint folder.")
    ckpt = resolve_resume(str(path), path)
    assert ckpt is not None
    state = load_state(ckpt, map_location="cpu")
    cfg = config_from_dict(state["config"])
    model = build_on_meta(cfg.model)
    model.to_empty(device=device)
    model.init_weights()  # rope tables; weights are overwritten next
    model.load_state_dict(state["model"])
    return model, Tokenizer.from_file(cfg.data.tokenizer)
