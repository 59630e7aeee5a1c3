"""``bigtrain export``: a checkpoint (or a run folder's latest) → a Hugging Face folder or one torch file.

The folder is a ``LlamaForCausalLM``, or a ``Qwen3ForCausalLM`` for a ``model.qk_norm`` model; a
Mixture-of-Experts model is a ``MixtralForCausalLM`` (``Qwen3MoeForCausalLM`` with ``model.qk_norm``), and
one that neither can express (shared experts, a routing bias, ...) is refused before its weights are read.

Reads any checkpoint (DCP from single/DDP/FSDP, or DeepSpeed ZeRO) in one CPU process, whatever world
size wrote it; the HF format itself lives in :mod:`bigtrain.checkpoint.hf`. The bundled tokenizer is the one the
checkpoint was trained with (:func:`bigtrain.generate.checkpoint_tokenizer`: ``--tokenizer``, the checkpoint's
own ``tokenizer.json``, else ``data.tokenizer``; checked against the recorded fingerprint).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from bigtrain import messages
from bigtrain.checkpoint.hf import DEFAULT_SHARD_BYTES, hf_architecture, hf_config, to_hf_state, write_safetensors
from bigtrain.checkpoint.manager import find_checkpoint, load_model_weights
from bigtrain.checkpoint.manifest import Manifest
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.generate import CheckpointTokenizer, checkpoint_manifest, checkpoint_tokenizer, run_folder
from bigtrain.model.config import ModelConfig
from bigtrain.sections import parse_section
from bigtrain.train.status import process_alive


def _copy_tokenizer(found: CheckpointTokenizer, config: dict[str, Any], out: Path) -> tuple[list[str], int | None]:
    """Write the checkpoint's tokenizer into ``out`` as a tokenizer that conditions a prompt as bigtrain does.

    bigtrain starts every document with its EOS token: training packs ``... EOS doc EOS doc`` and
    ``bigtrain generate`` (:func:`bigtrain.model.sampling.generate`) feeds ``[EOS, *encode(prompt)]``,
    just ``[EOS]`` for an empty prompt. So the exported ``tokenizer.json`` gets a TemplateProcessing
    post-processor that puts EOS before the text (``EOS $A``, a pair ``EOS $A EOS $B``), replacing the
    file's own post-processor (bigtrain encodes without special tokens, so never applies that one), and
    ``tokenizer_config.json`` names EOS as ``bos_token`` with ``add_bos_token: true`` (as Llama tokenizers
    do; transformers 5 rebuilds the same template from it). A literal EOS string in a prompt stays text
    (``split_special_tokens``), as in bigtrain. ``found`` was read and checked by bigtrain's Tokenizer (and its
    fingerprint against the checkpoint's); what is written is that tokenizer, and it must load back. Its file is
    only read. Returns (files written, EOS id or None: the byte-level fallback, which has no file, writes none).
    """
    if found.path is None:
        return [], None
    tok = found.tokenizer
    spec = json.loads(tok.backend.to_str())  # exactly the tokenizer that was checked
    spec["post_processor"] = _document_start_processor(tok.eos_token, tok.eos_id)
    (out / "tokenizer.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "bos_token": tok.eos_token,
        "add_bos_token": True, "add_eos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("model", {}).get("max_seq_len", 2048)),
    }, indent=2) + "\n", encoding="utf-8")
    try:
        back = Tokenizer.from_file(out / "tokenizer.json")
    except UserError as exc:
        raise UserError(f"bigtrain export: the tokenizer written from {found.where} does not load back "
                        f"({' '.join(str(exc).split())}); nothing was written.") from None
    if (back.vocab_size, back.eos_id) != (tok.vocab_size, tok.eos_id):
        raise UserError(f"bigtrain export: the tokenizer written from {found.where} reads back as vocabulary "
                        f"{back.vocab_size}, EOS {back.eos_id} instead of {tok.vocab_size}, {tok.eos_id}; nothing "
                        f"was written.")
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
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | Path | None = None) -> Path:
    """Export ``source`` (a checkpoint folder, or a run folder: its latest checkpoint) to ``out``.

    Atomic: everything is written into a temporary sibling of the target and renamed into place at the
    end, so a failure (a full disk, an interrupt) leaves no partial folder or truncated file; such siblings
    left by a killed export are removed by the next one. An existing target is replaced only with
    ``overwrite``. ``tokenizer`` (``--tokenizer``, hf only) replaces the checkpoint's own tokenizer, and must
    have the fingerprint the checkpoint recorded.
    """
    if to not in ("hf", "torch"):
        raise UserError(f"--to {to!r}: use hf (Hugging Face Llama / Qwen3 / Mixtral / Qwen3-MoE folder) or torch "
                        f"(one state-dict file).")
    if tokenizer is not None and to != "hf":
        raise UserError("--tokenizer applies to --to hf only: a torch export holds the weights alone.")
    out = Path(out).expanduser()
    target = out / "model.pt" if to == "torch" and out.is_dir() else out
    _clean_leftovers(target)
    _check_target(target, to, overwrite)
    ckpt = find_checkpoint(source, "bigtrain export")
    _check_no_overlap(target, ckpt)
    found = None
    if to == "hf":  # what the target cannot express, and the tokenizer, before the weights are read
        checked = checkpoint_manifest(ckpt)
        _check_hf_architecture(checked)
        found = checkpoint_tokenizer(ckpt, checked, tokenizer, "bigtrain export")
    weights, manifest = load_model_weights(ckpt)
    model_cfg = parse_section(ModelConfig, manifest.config.get("model", {}), "model")
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    created = _missing_folders(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if found is None:
            torch.save(weights, tmp)
            summary = f"{len(weights)} tensors, bigtrain names"
        else:
            tmp.mkdir()
            tok_files, eos_id = _copy_tokenizer(found, manifest.config, tmp)
            files = write_safetensors(to_hf_state(weights, model_cfg), tmp, max_shard_bytes=max_shard_bytes,
                                      metadata={"bigtrain_step": str(manifest.step)})
            (tmp / "config.json").write_text(json.dumps(hf_config(model_cfg, eos_token_id=eos_id), indent=2))
            note = (f", tokenizer from {found.where}" if tok_files
                    else " (no tokenizer: the run used the byte-level fallback, which has no file)")
            summary = f"config.json, {', '.join(files + tok_files)}{note}"
        _replace(tmp, target)
    except BaseException as exc:  # a full disk, an interrupt, a bug: nothing of this export stays behind
        _remove(tmp)
        for folder in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise UserError(f"bigtrain export: writing {target} failed: {reason}; nothing was written. Free disk space "
                        f"or choose a writable place for the output.") from None
    messages.say(f"exported {ckpt} (step {manifest.step}) -> {target}: {summary}")
    return target


def _check_hf_architecture(manifest: Manifest) -> None:
    """Refuse a model with no Hugging Face equivalent from its manifest, before reading its weights."""
    hf_architecture(parse_section(ModelConfig, manifest.config.get("model", {}), "model"))


def _write_failure(exc: BaseException) -> str | None:
    """The reason, in a few words, of a write that failed outside bigtrain (a full disk, permissions, a quota), or
    None for anything else. safetensors' SafetensorError and torch.save's RuntimeError wrap the OS error in text."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    text = " ".join(str(exc).split())
    if any(words in text for words in ("No space left on device", "StorageFull", "os error 28")):
        return "No space left on device"
    if any(words in text for words in ("Disk quota exceeded", "QuotaExceeded", "os error 122")):
        return "Disk quota exceeded"
    if type(exc).__name__ == "SafetensorError":
        return f"safetensors could not write the weights ({text[:200]})"
    if isinstance(exc, RuntimeError) and "file write failed" in text:  # torch.save (PytorchStreamWriter)
        return "the file write failed (is the disk full?)"
    return None


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first (an export that fails removes them)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


_LEFTOVER = re.compile(r"(partial|old)-([0-9]{1,10})")


def _clean_leftovers(target: Path) -> None:
    """Remove ``.NAME.partial-PID`` and ``.NAME.old-PID`` siblings of ``target`` whose export process no longer
    exists on this host (a killed export), with a note. An ``.old`` one while ``target`` is missing holds the
    previous export (killed between its two renames): it is put back instead."""
    parent, prefix = target.parent, f".{target.name}."
    if not parent.is_dir():
        return
    dead = []
    for entry in parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or entry.is_symlink() or process_alive(int(match.group(2))):
            continue
        dead.append((match.group(1), int(match.group(2)), entry))
    for kind, pid, entry in sorted(dead):  # "old" first
        if kind == "old" and not target.exists() and not target.is_symlink():
            os.replace(entry, target)
            messages.warn(f"note: restored {target} from {entry.name}: export process {pid} was killed while "
                          f"replacing it")
            continue
        _remove(entry)
        messages.warn(f"note: removed {entry}, left by an export (process {pid}) that no longer runs")


def _check_target(target: Path, to: str, overwrite: bool) -> None:
    """Refuse a target of the wrong kind, or an existing one without ``overwrite``."""
    if to == "hf" and target.exists() and not target.is_dir():
        raise UserError(f"bigtrain export --to hf writes a folder, but {target} is a file; pass a folder path.")
    exists = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if exists and not overwrite:
        raise UserError(f"bigtrain export: {target} exists{' and is not empty' if target.is_dir() else ''}; pass "
                        f"--overwrite to replace it, or another output path.")


def _check_no_overlap(target: Path, ckpt: Path) -> None:
    """Refuse an output that is the source run, holds it, or lies inside it: replacing it (--overwrite) would
    delete the run and its checkpoints, and writing into it would mix export files into the run."""
    run, out = run_folder(ckpt), target.resolve()
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
