"""``bigtrain export``: a checkpoint (or a run folder's latest) → a Hugging Face folder or one torch file.

The folder is a ``LlamaForCausalLM``, or a ``Qwen3ForCausalLM`` for a ``model.qk_norm`` model; a
Mixture-of-Experts model is a ``MixtralForCausalLM`` (``Qwen3MoeForCausalLM`` with ``model.qk_norm``), and
one that neither can express (shared experts, a routing bias, ...) is refused before its weights are read.

Reads any checkpoint (DCP from single/DDP/FSDP, or DeepSpeed ZeRO) in one CPU process, whatever world
size wrote it; the HF format itself lives in :mod:`bigtrain.checkpoint.hf`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bigtrain import messages
from bigtrain.checkpoint.hf import DEFAULT_SHARD_BYTES, hf_architecture, hf_config, to_hf_state, write_safetensors
from bigtrain.checkpoint.manager import find_checkpoint, load_model_weights
from bigtrain.checkpoint.manifest import ManifestError, read_manifest
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.model.config import ModelConfig
from bigtrain.sections import parse_section


def _copy_tokenizer(config: dict[str, Any], out: Path) -> tuple[list[str], int | None]:
    """Write the run's tokenizer into ``out`` as a tokenizer that conditions a prompt as bigtrain does.

    bigtrain starts every document with its EOS token: training packs ``... EOS doc EOS doc`` and
    ``bigtrain generate`` (:func:`bigtrain.model.sampling.generate`) feeds ``[EOS, *encode(prompt)]``,
    just ``[EOS]`` for an empty prompt. So the exported ``tokenizer.json`` gets a TemplateProcessing
    post-processor that puts EOS before the text (``EOS $A``, a pair ``EOS $A EOS $B``), replacing the
    file's own post-processor (bigtrain encodes without special tokens, so never applies that one), and
    ``tokenizer_config.json`` names EOS as ``bos_token`` with ``add_bos_token: true`` (as Llama tokenizers
    do; transformers 5 rebuilds the same template from it). A literal EOS string in a prompt stays text
    (``split_special_tokens``), as in bigtrain. The run's own file is only read. Returns (files written,
    EOS id or None); a tokenizer bigtrain cannot read is copied as is (None).
    """
    tok_path = Path(str(config.get("data", {}).get("tokenizer", "")))
    if not tok_path.is_file():
        return [], None
    try:
        tok = Tokenizer.from_file(tok_path)
    except UserError:  # a tokenizer bigtrain cannot parse is still copied as is
        shutil.copyfile(tok_path, out / "tokenizer.json")
        return ["tokenizer.json"], None
    spec = json.loads(tok_path.read_text(encoding="utf-8"))
    spec["post_processor"] = _document_start_processor(tok.eos_token, tok.eos_id)
    (out / "tokenizer.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "bos_token": tok.eos_token,
        "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("model", {}).get("max_seq_len", 2048)),
    }, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"], tok.eos_id


def _document_start_processor(token: str, token_id: int) -> dict[str, Any]:
    """A ``tokenizers`` TemplateProcessing (as JSON) that puts ``token`` before a text and before each of a pair."""
    def start(type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    def text(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {"type": "TemplateProcessing", "single": [start(0), text("A", 0)],
            "pair": [start(0), text("A", 0), start(1), text("B", 1)],
            "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}}}


def export_checkpoint(source: str | Path, to: str, out: str | Path, *, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Export ``source`` (a checkpoint folder, or a run folder: its latest checkpoint) to ``out``.

    Atomic: everything is written into a temporary sibling of the target and renamed into place at the
    end, so a failure (a full disk) leaves no partial folder or truncated file. An existing target is
    replaced only with ``overwrite``.
    """
    if to not in ("hf", "torch"):
        raise UserError(f"--to {to!r}: use hf (Hugging Face Llama / Qwen3 / Mixtral / Qwen3-MoE folder) or torch "
                        f"(one state-dict file).")
    out = Path(out).expanduser()
    target = out / "model.pt" if to == "torch" and out.is_dir() else out
    _check_target(target, to, overwrite)
    ckpt = find_checkpoint(source, "bigtrain export")
    _check_no_overlap(target, ckpt)
    if to == "hf":
        _check_hf_architecture(ckpt)
    weights, manifest = load_model_weights(ckpt)
    model_cfg = parse_section(ModelConfig, manifest.config.get("model", {}), "model")
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if to == "torch":
            torch.save(weights, tmp)
            summary = f"{len(weights)} tensors, bigtrain names"
        else:
            tmp.mkdir()
            tok_files, eos_id = _copy_tokenizer(manifest.config, tmp)
            files = write_safetensors(to_hf_state(weights, model_cfg), tmp, max_shard_bytes=max_shard_bytes,
                                      metadata={"bigtrain_step": str(manifest.step)})
            (tmp / "config.json").write_text(json.dumps(hf_config(model_cfg, eos_token_id=eos_id), indent=2))
            note = "" if tok_files else " (no tokenizer copied: the run's data.tokenizer file was not found)"
            summary = f"config.json, {', '.join(files + tok_files)}{note}"
        _replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        raise UserError(f"bigtrain export: writing {target} failed: {exc.strerror or exc}"
                        f"{f' ({exc.filename})' if exc.filename else ''}; nothing was written. Free disk space or "
                        f"choose a writable place for the output.") from None
    messages.say(f"exported {ckpt} (step {manifest.step}) -> {target}: {summary}")
    return target


def _check_hf_architecture(ckpt: Path) -> None:
    """Refuse a model with no Hugging Face equivalent from its manifest, before reading its weights."""
    try:
        manifest = read_manifest(ckpt)
    except ManifestError:
        return  # load_model_weights reports it
    hf_architecture(parse_section(ModelConfig, manifest.config.get("model", {}), "model"))


def _check_target(target: Path, to: str, overwrite: bool) -> None:
    """Refuse a target of the wrong kind, or an existing one without ``overwrite``."""
    if to == "hf" and target.exists() and not target.is_dir():
        raise UserError(f"bigtrain export --to hf writes a folder, but {target} is a file; pass a folder path.")
    exists = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if exists and not overwrite:
        raise UserError(f"bigtrain export: {target} exists{' and is not empty' if target.is_dir() else ''}; pass "
                        f"--overwrite to replace it, or another output path.")


def _source_run(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (RUN/checkpoints/step_N -> RUN), or the checkpoint folder itself."""
    ckpt = ckpt.resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def _check_no_overlap(target: Path, ckpt: Path) -> None:
    """Refuse an output that is the source run, holds it, or lies inside it: replacing it (--overwrite) would
    delete the run and its checkpoints, and writing into it would mix export files into the run."""
    run, out = _source_run(ckpt), target.resolve()
    if out == run or run in out.parents or out in run.parents:
        where = "is" if out == run else ("holds" if out in run.parents else "lies inside")
        raise UserError(f"bigtrain export: the output {target} {where} the run being exported ({run}); "
                        f"choose an output path outside {run}.")


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is moved aside first and removed only after."""
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    os.replace(tmp, target)
    if aside is not None:
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
