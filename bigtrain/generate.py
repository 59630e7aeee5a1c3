"""``bigtrain generate``: load a trained model from a run folder or checkpoint and sample text from it.

The sampling itself (temperature and top-k) is :func:`bigtrain.model.sampling.generate`, which the
trainer also uses for its end-of-run sample.
"""
from __future__ import annotations

from pathlib import Path

from bigtrain.data.tokenizer import Tokenizer
from bigtrain.model import Decoder
from bigtrain.model.sampling import generate

__all__ = ["generate", "load_for_generation"]


def load_for_generation(run_dir: str | Path, device: str = "cpu") -> tuple[Decoder, Tokenizer]:
    """Model (latest checkpoint of a run folder, or a checkpoint folder) and its tokenizer."""
    from bigtrain.checkpoint.manager import find_checkpoint, load_state
    from bigtrain.config import config_from_dict
    from bigtrain.model import build_on_meta

    ckpt = find_checkpoint(run_dir, "bigtrain generate")
    state = load_state(ckpt, map_location="cpu")
    cfg = config_from_dict(state["config"])
    model = build_on_meta(cfg.model)
    model.to_empty(device=device)
    model.init_weights()  # rope tables; weights are overwritten next
    model.load_state_dict(state["model"])
    return model, Tokenizer.from_file(cfg.data.tokenizer)
