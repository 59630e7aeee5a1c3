"""``bigtrain ckpt ls RUN_DIR`` and ``bigtrain ckpt verify CKPT``: list and check checkpoints without loading them."""
from __future__ import annotations

from pathlib import Path

from bigtrain.checkpoint.manager import CheckpointManager
from bigtrain.checkpoint.manifest import MANIFEST_FILE, ManifestError, read_manifest, step_of, verify
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


def list_checkpoints(run_dir: str | Path) -> str:
    """A table of every checkpoint folder of a run, committed or not, with the one resume would pick."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass a run folder (run.out_dir).")
    root = _checkpoints_root(path)
    manager = CheckpointManager(root.parent)
    pointer = manager.latest_pointer()
    limit = step_of(pointer) if pointer is not None else None
    chosen = manager.latest()
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
