"""``bigtrain ckpt ls RUN_DIR`` and ``bigtrain ckpt verify CKPT``: list and check checkpoints without loading them."""
from __future__ import annotations

from pathlib import Path

from bigtrain.checkpoint.manager import CheckpointManager, verify
from bigtrain.checkpoint.manifest import (
    MANIFEST_FILE,
    SCRATCH_PREFIXES,
    ManifestError,
    check_files,
    list_files,
    read_manifest,
    step_of,
)
from bigtrain.checkpoint.rank_state import rank_file
from bigtrain.errors import UserError


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _checkpoints_root(path: Path) -> Path:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name == "checkpoints" and path.is_dir():
        return path
    raise UserError(f"{str(path)!r} has no checkpoints/ folder; pass a run folder (run.out_dir).")


def _looks_whole(ckpt: Path) -> bool:
    """Manifest valid, every listed file there at its size, nothing unlisted on disk, every rank's file listed.

    What ``checkpoint.resume=auto``'s cheap pass checks, minus the format's own index: DCP's ``.metadata`` is
    a pickle, and ``ls`` unpickles nothing from a checkpoint (a crafted one could run code; reading it safely
    is ``verify``'s and the resume's job)."""
    try:
        manifest = read_manifest(ckpt)
    except ManifestError:
        return False
    listed = set(manifest.files)
    on_disk = {name for name in list_files(ckpt) if not name.startswith(SCRATCH_PREFIXES)}
    ranks = {rank_file(rank) for rank in range(manifest.world_size)}
    return on_disk <= listed and ranks <= listed and not check_files(ckpt, manifest.files, checksums=False)


def _auto_pick(manager: CheckpointManager) -> Path | None:
    """The checkpoint ``checkpoint.resume=auto`` picks, as far as manifests and sizes tell (a resume that then
    finds a bad index skips to the next one, saying why)."""
    return next((path for path in manager.candidates() if _looks_whole(path)), None)


def list_checkpoints(run_dir: str | Path) -> str:
    """A table of every checkpoint folder of a run, committed or not, with the one resume would pick."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run folder (run.out_dir).")
    root = _checkpoints_root(path)
    manager = CheckpointManager(root.parent)
    pointer = manager.latest_pointer()
    limit = step_of(pointer) if pointer is not None else None
    chosen = _auto_pick(manager)
    rows = [("checkpoint", "step", "tokens", "ranks", "strategy", "size", "created", "status")]
    entries = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.name)
    for entry in entries:
        if entry.name.endswith(".tmp"):
            rows.append((entry.name, "-", "-", "-", "-", "-", "-", "partial save (never committed)"))
            continue
        try:
            m = read_manifest(entry)
        except ManifestError:
            rows.append((entry.name, "-", "-", "-", "-", "-", "-", f"no valid {MANIFEST_FILE}: unusable"))
            continue
        if entry == chosen:
            status = "latest (resume: auto picks this)"
        elif limit is not None and m.step > limit:
            status = "newer than latest: commit did not finish"
        else:
            status = "ok"
        rows.append((entry.name, str(m.step), f"{m.tokens_seen:,}", str(m.world_size), m.strategy,
                     _human(m.total_bytes), m.created, status))
    if len(rows) == 1:
        return f"{root}: no checkpoints\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{root}\n" + "\n".join(lines) + "\n(sizes and manifests only; `bigtrain ckpt verify` checks checksums)\n"


def verify_checkpoints(target: str | Path) -> tuple[str, bool]:
    """Check sizes and CRC32 of one checkpoint folder, or of every checkpoint of a run folder."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a checkpoint folder (…/checkpoints/step_N) or a "
                        f"run folder.")
    if (path / MANIFEST_FILE).exists() or step_of(path) is not None:
        folders = [path]
    else:
        root = _checkpoints_root(path)
        folders = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=lambda p: p.name)
    lines, ok = [], True
    for folder in folders:
        manifest, problems = verify(folder)
        if problems:
            ok = False
            lines.append(f"CORRUPT {folder}")
            lines.extend(f"  - {p}" for p in problems)
        else:
            assert manifest is not None
            lines.append(f"OK      {folder}: {len(manifest.files)} files, {_human(manifest.total_bytes)}, "
                         f"step {manifest.step}, {manifest.world_size} ranks ({manifest.strategy})")
            if manifest.backend == "deepspeed":
                lines.append("  note: DeepSpeed's files are Python pickles; loading them can run code. Resume from "
                             "ZeRO checkpoints you trust only (bigtrain's own files and DCP checkpoints load without "
                             "unpickling arbitrary objects).")
    if not folders:
        lines.append(f"{path}: no checkpoints")
    return "\n".join(lines) + "\n", ok
