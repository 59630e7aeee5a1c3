"""``bigtrain export``: a checkpoint (or a run folder's latest) → a Hugging Face Llama folder or one torch file.

Reads any checkpoint (DCP from single/DDP/FSDP, or DeepSpeed ZeRO) in one CPU process, whatever world
size wrote it; the HF format itself lives in :mod:`bigtrain.checkpoint.hf`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bigtrain import messages
from bigtrain.checkpoint.hf import DEFAULT_SHARD_BYTES, hf_config, to_hf_state, write_safetensors
from bigtrain.checkpoint.manager import load_model_weights, resolve_resume
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.model.config import ModelConfig
from bigtrain.sections import parse_section


def _copy_tokenizer(config: dict[str, Any], out: Path) -> tuple[list[str], int | None]:
    """Copy the run's tokenizer.json (+ a minimal tokenizer_config.json); (files, eos id or None)."""
    tok_path = Path(str(config.get("data", {}).get("tokenizer", "")))
    if not tok_path.is_file():
        return [], None
    shutil.copyfile(tok_path, out / "tokenizer.json")
    files = ["tokenizer.json"]
    eos_id = None
    try:
        tok = Tokenizer.from_file(tok_path)
        eos_id = tok.eos_id
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "bos_token": tok.eos_token,
            "model_max_length": int(config.get("model", {}).get("max_seq_len", 2048)),
        }, indent=2))
        files.append("tokenizer_config.json")
    except Exception:  # noqa: BLE001 - a tokenizer bigtrain cannot parse is still copied as is
        pass
    return files, eos_id


def export_checkpoint(source: str | Path, to: str, out: str | Path, *,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Export ``source`` (a checkpoint folder, or a run folder: its latest checkpoint) to ``out``."""
    src = Path(source)
    if not src.exists():
        raise UserError(f"{str(src)!r} does not exist; pass a checkpoint folder (…/checkpoints/step_N) or a run folder.")
    if to not in ("hf", "torch"):
        raise UserError(f"--to {to!r}: use hf (Hugging Face Llama folder) or torch (one state-dict file).")
    ckpt = resolve_resume(str(src), src)
    assert ckpt is not None  # resolve_resume raises for a folder without checkpoints
    weights, manifest = load_model_weights(ckpt)
    model_cfg = parse_section(ModelConfig, manifest.config.get("model", {}), "model")
    out = Path(out)
    if to == "torch":
        target = out / "model.pt" if out.is_dir() else out
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, target)
        messages.say(f"exported {ckpt} (step {manifest.step}) -> {target} ({len(weights)} tensors, bigtrain names)")
        return target
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass a new or empty folder to export into.")
    out.mkdir(parents=True, exist_ok=True)
    tok_files, eos_id = _copy_tokenizer(manifest.config, out)
    files = write_safetensors(to_hf_state(weights, model_cfg), out, max_shard_bytes=max_shard_bytes,
                              metadata={"bigtrain_step": str(manifest.step)})
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg, eos_token_id=eos_id), indent=2))
    note = "" if tok_files else " (no tokenizer copied: the run's data.tokenizer file was not found)"
    messages.say(f"exported {ckpt} (step {manifest.step}) -> {out}: config.json, {', '.join(files + tok_files)}{note}")
    return out
