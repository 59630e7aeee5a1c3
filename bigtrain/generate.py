"""``bigtrain generate``: load a trained model from a run folder or checkpoint and sample text from it.

The sampling itself (temperature and top-k) is :func:`bigtrain.model.sampling.generate`, which the
trainer also uses for its end-of-run sample.

:func:`checkpoint_tokenizer` finds the tokenizer a checkpoint was trained with (``bigtrain export`` uses it
too): ``--tokenizer PATH``, else the checkpoint's own ``tokenizer.json``, else the config's ``data.tokenizer``
(checkpoints saved before they kept the tokenizer), always checked against the fingerprint the checkpoint
recorded, so a different tokenizer never decodes the model's ids into garbage.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigtrain import messages
from bigtrain.checkpoint.manifest import TOKENIZER_FILE, Manifest, ManifestError, check_files, read_manifest
from bigtrain.data.tokenizer import Tokenizer, tokenizer_file
from bigtrain.errors import UserError
from bigtrain.model import Decoder
from bigtrain.model.sampling import generate

__all__ = ["CheckpointTokenizer", "checkpoint_manifest", "checkpoint_tokenizer", "generate", "load_for_generation"]

_FIX = "pass --tokenizer PATH with the tokenizer.json the run trained with"


def load_for_generation(run_dir: str | Path, device: str = "cpu",
                        tokenizer: str | Path | None = None) -> tuple[Decoder, Tokenizer]:
    """Model (latest checkpoint of a run folder, or a checkpoint folder) and its tokenizer (``tokenizer``: an
    explicit tokenizer.json, checked against the checkpoint's; default: the checkpoint's own)."""
    from bigtrain.checkpoint.manager import find_checkpoint, load_state
    from bigtrain.config import config_from_dict
    from bigtrain.model import build_on_meta

    ckpt = find_checkpoint(run_dir, "bigtrain generate")
    # The tokenizer first: a wrong or missing one is refused before the weights are read.
    tok = checkpoint_tokenizer(ckpt, checkpoint_manifest(ckpt), tokenizer, "bigtrain generate").tokenizer
    state = load_state(ckpt, map_location="cpu")
    cfg = config_from_dict(state["config"])
    model = build_on_meta(cfg.model)
    model.to_empty(device=device)
    model.init_weights()  # rope tables; weights are overwritten next
    model.load_state_dict(state["model"])
    return model, tok


def checkpoint_manifest(ckpt: Path) -> Manifest:
    """The manifest of a committed checkpoint folder; an unreadable one is a UserError."""
    try:
        return read_manifest(ckpt)
    except ManifestError as exc:
        raise UserError(f"{exc}; pass a committed checkpoint folder (…/checkpoints/step_N) or a run folder.") from None


@dataclass(frozen=True)
class CheckpointTokenizer:
    """The tokenizer of a checkpoint, and where it came from."""

    tokenizer: Tokenizer
    path: Path | None  # the file it was read from; None: the file-less byte-level fallback
    where: str  # how it was found, for messages


def run_folder(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (RUN/checkpoints/step_N -> RUN), or the checkpoint folder itself."""
    ckpt = ckpt.resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def checkpoint_tokenizer(ckpt: Path, manifest: Manifest, explicit: str | Path | None,
                         label: str) -> CheckpointTokenizer:
    """The tokenizer checkpoint ``ckpt`` was trained with, from the first of:

    1. ``explicit`` (``--tokenizer PATH``; ``''`` or ``byte``: the byte-level fallback);
    2. the checkpoint's own ``tokenizer.json`` (saved with it; its size and CRC32 checked against the manifest);
    3. the config's ``data.tokenizer`` (a checkpoint saved before checkpoints kept the tokenizer): as given if
       absolute, else relative to the folder the run was started from (where ``run.out_dir`` leads to the run
       folder), the current folder, then each folder above the run folder.

    Refused (UserError, one line; ``label`` starts it): a tokenizer that cannot be found or read, one whose
    fingerprint differs from the one the checkpoint recorded, one with more ids than the model's vocabulary.
    """
    record = manifest.tokenizer
    own = ckpt / TOKENIZER_FILE
    file: Path | None
    if explicit is not None:
        file = tokenizer_file(explicit)
        where = f"{file} (--tokenizer)" if file is not None else f"byte-level (--tokenizer {str(explicit)!r})"
        if file is not None and not file.is_file():
            raise UserError(f"{label}: --tokenizer {explicit}: {file} does not exist; {_FIX}.")
    elif own.is_file():
        file, where = own, f"{own} (saved with the checkpoint)"
        problems = check_files(ckpt, manifest.files, [TOKENIZER_FILE]) if TOKENIZER_FILE in manifest.files else []
        if problems:
            raise UserError(f"{label}: the checkpoint's tokenizer is damaged ({problems[0]}); {_FIX}.")
    else:
        value = str(manifest.config.get("data", {}).get("tokenizer", ""))
        candidates = _config_candidates(value, ckpt, manifest.config)
        file = next((c for c in candidates if c.is_file()), None) if candidates else None
        if candidates and file is None:
            kept = (f"its {TOKENIZER_FILE} is missing" if record is not None and record.file
                    else f"it holds no {TOKENIZER_FILE} (saved by an older bigtrain)")
            looked = ", ".join(str(c) for c in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
            raise UserError(f"{label}: the tokenizer of {ckpt} cannot be found: {kept}, and data.tokenizer={value!r} "
                            f"is not a file (looked at {looked}); {_FIX}.")
        where = f"{file} (data.tokenizer)" if file is not None else f"byte-level (data.tokenizer={value!r})"
    tok = _load(file, where, manifest, label)
    if record is not None and tok.fingerprint != record.fingerprint:
        raise UserError(f"{label}: the tokenizer {where} has fingerprint {tok.fingerprint}, but {ckpt} was trained "
                        f"with fingerprint {record.fingerprint}; {_FIX} (fingerprint {record.fingerprint}).")
    vocab = manifest.config.get("model", {}).get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise UserError(f"{label}: the tokenizer {where} has {tok.vocab_size} ids, more than the model's vocabulary "
                        f"({vocab}), so it is not the run's tokenizer; {_FIX}.")
    if record is None:
        messages.warn(f"note: {ckpt} records no tokenizer fingerprint (saved by an older bigtrain): using {where} "
                      f"unchecked")
    return CheckpointTokenizer(tok, file, where)


def _config_candidates(value: str, ckpt: Path, config: dict[str, Any]) -> list[Path]:
    """Where ``data.tokenizer`` may be, most likely first ([] for the byte-level fallback)."""
    path = tokenizer_file(value)
    if path is None:
        return []
    if path.is_absolute():
        return [path]
    run = run_folder(ckpt)
    bases: list[Path] = []
    out_dir = Path(str(config.get("run", {}).get("out_dir", "")))
    parts = out_dir.parts
    if parts and not out_dir.is_absolute() and ".." not in parts and run.parts[-len(parts):] == parts:
        bases.append(Path(*run.parts[:-len(parts)]))  # the folder the run was started from
    bases += [Path.cwd(), *run.parents]
    out: list[Path] = []
    for base in bases:
        candidate = tokenizer_file(base / path)
        if candidate is not None and candidate not in out:
            out.append(candidate)
    return out


def _load(file: Path | None, where: str, manifest: Manifest, label: str) -> Tokenizer:
    """Read the tokenizer (with the EOS token the checkpoint recorded); one line naming it if that fails."""
    if file is None:
        return Tokenizer.byte_level()
    eos = manifest.tokenizer.eos_token if manifest.tokenizer is not None else None
    try:
        return Tokenizer.from_file(file, eos_token=eos)
    except UserError as exc:
        if eos is not None:  # lacks the run's EOS token: not the run's tokenizer, which the fingerprint then says
            with contextlib.suppress(UserError):
                return Tokenizer.from_file(file)
        raise UserError(f"{label}: the tokenizer {where} cannot be used: {' '.join(str(exc).split())}") from None
