"""`bigtrain data prepare`: turn local text / jsonl / parquet files into tokenizer + train/val token shards.

The inputs are found and decoded by :mod:`bigtrain.data.documents`, exactly as a streamed text source
or `bigtrain data tokenizer train` would read them.

Output directory layout (shared with the demo corpus; see docs/data.md, and
bigtrain.data.shards.read_manifest / verify_prepared to check one):

    OUT/tokenizer.json         the tokenizer the shards were written with
    OUT/train/shard_00000.bin  token shards (bigtrain.data.shards format)
    OUT/val/shard_00000.bin    held-out whole documents
    OUT/manifest.json          what was built from what; written last (its presence = complete)

Everything is built in the sibling directory ``OUT.partial`` and renamed to OUT at the end, so
an error or a kill never leaves a half-written OUT behind. The build is resumable: after every
completed shard, ``OUT.partial/progress.json`` records what is done, and running the same
command again (same inputs and options) continues from there instead of starting over.
Tokenization runs in ``num_workers`` processes (batched `tokenizers` calls), with a progress
bar (bytes, rate, ETA) on a terminal.

One prepare at a time per output: ``OUT.lock`` (next to OUT, like ``OUT.partial``) names the holder (host,
PID, start time) and is held from before the input scan until OUT is published. A second prepare into the
same ``--out-dir`` is refused at once, naming the holder, and touches nothing of the first one's. A lock
whose holder is provably gone (this host and a PID that no longer runs, or another host's lock whose
heartbeat stopped) is taken over with a note; an interrupted build left in ``OUT.partial`` then resumes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.data.documents import ScanStats, find_files, iter_documents
from bigtrain.data.shards import dtype_for_vocab, manifest_head, write_manifest, write_shard
from bigtrain.data.tokenizer import MIN_BPE_VOCAB, Tokenizer
from bigtrain.errors import EnvironmentFailure, UserError
from bigtrain.messages import say, warn

_BATCH_CHARS = 8 << 20  # text per encode_batch call: big enough to keep Rust busy, small in RAM
_BATCH_DOCS = 1024


# --------------------------------------------------------------------------- output
class ShardWriter:
    """Streams documents (each followed by EOS) into shards of at most `shard_tokens` tokens.

    A document is never split across shards unless it alone exceeds `shard_tokens`; a shard's
    num_docs/num_bytes count the documents that *end* in it.
    """

    def __init__(self, out_dir: Path, tokenizer: Tokenizer, shard_tokens: int, source: str | None,
                 on_flush: Callable[[], None] | None = None):
        self.out_dir, self.tok, self.shard_tokens, self.source = out_dir, tokenizer, shard_tokens, source
        self.on_flush = on_flush
        self.dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size))
        self.buf: list[np.ndarray] = []
        self.buf_tokens = self.buf_docs = self.buf_bytes = 0
        self.shards: list[Path] = []
        self.num_docs = self.num_tokens = self.num_bytes = 0
        self.docs_added = 0  # documents given to add(), in order
        self.saved: dict[str, Any] = self.state_dict()  # state at the last flush on a document boundary

    def state_dict(self) -> dict[str, Any]:
        """Resumable state; valid only while the buffer is empty (right after a flush at a document boundary)."""
        return {"docs": self.docs_added, "num_docs": self.num_docs, "num_tokens": self.num_tokens,
                "num_bytes": self.num_bytes, "shards": [p.name for p in self.shards]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue after the state recorded by :meth:`state_dict` (its shard files are on disk)."""
        self.docs_added, self.num_docs = int(saved["docs"]), int(saved["num_docs"])
        self.num_tokens, self.num_bytes = int(saved["num_tokens"]), int(saved["num_bytes"])
        self.shards = [self.out_dir / name for name in saved["shards"]]
        self.saved = dict(saved)

    def add(self, ids: Sequence[int], nbytes: int) -> None:
        """Append one document's ids (EOS is added here)."""
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.tok.eos_id
        if self.buf_tokens and self.buf_tokens + len(arr) > self.shard_tokens:
            self._flush()
            # Every document so far is on disk: a resumed build can start right here.
            self.saved = self.state_dict()
            if self.on_flush is not None:
                self.on_flush()
        self.docs_added += 1
        while len(arr) > self.shard_tokens:  # an oversized document: full shards of its head
            self.buf.append(arr[: self.shard_tokens])
            self.buf_tokens = self.shard_tokens
            self._flush()
            arr = arr[self.shard_tokens :]
        self.buf.append(arr)
        self.buf_tokens += len(arr)
        self.buf_docs += 1
        self.buf_bytes += nbytes

    def _flush(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"shard_{len(self.shards):05d}.bin"
        tokens = np.concatenate(self.buf)
        write_shard(path, tokens, num_docs=self.buf_docs, num_bytes=self.buf_bytes, vocab_size=self.tok.vocab_size,
                    eos_id=self.tok.eos_id, tokenizer_fingerprint=self.tok.fingerprint, source=self.source)
        self.shards.append(path)
        self.num_docs += self.buf_docs
        self.num_tokens += len(tokens)
        self.num_bytes += self.buf_bytes
        self.buf, self.buf_tokens, self.buf_docs, self.buf_bytes = [], 0, 0, 0

    def close(self, root: Path) -> dict[str, Any]:
        """Write the last shard; return the split summary (shard paths relative to `root`)."""
        if self.buf:
            self._flush()
        return {"num_docs": self.num_docs, "num_tokens": self.num_tokens, "num_bytes": self.num_bytes,
                "shards": [p.relative_to(root).as_posix() for p in self.shards]}


_WORKER_TOK: Tokenizer | None = None


def _worker_init(tokenizer_json: str, eos_token: str) -> None:
    """Each tokenizer process builds its own tokenizer (a Rust tokenizer must not cross a fork)."""
    global _WORKER_TOK
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER_TOK = Tokenizer(HFTokenizer.from_str(tokenizer_json), eos_token=eos_token)


def _worker_encode(batch: list[tuple[str, int, str]]) -> tuple[list[tuple[int, str]], list[list[int]]]:
    assert _WORKER_TOK is not None
    return [(nbytes, split) for _, nbytes, split in batch], _WORKER_TOK.encode_batch([b[0] for b in batch])


def _batches(docs: Iterable[tuple[str, int, str]]) -> Iterator[list[tuple[str, int, str]]]:
    """Documents grouped for one encode_batch call (by count and by characters)."""
    batch: list[tuple[str, int, str]] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[0])
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_to_shards(docs: Iterable[tuple[str, int, str]], tokenizer: Tokenizer, root: Path, *,
                       shard_tokens: int, source: str | None = None, total_bytes: int | None = None,
                       num_workers: int = 1, resume: dict[str, dict[str, Any]] | None = None,
                       on_progress: Callable[[dict[str, dict[str, Any]]], None] | None = None,
                       ) -> dict[str, dict[str, Any]]:
    """Encode (text, utf8_bytes, split) documents in batches into `root/<split>/shard_*.bin`.

    ``num_workers > 1`` encodes batches in that many processes (order is kept). ``resume``
    (per split, from an earlier ``on_progress`` call) skips the documents already in shards;
    ``on_progress`` is called with every split's resumable state after each completed shard.
    """
    from tqdm import tqdm

    writers: dict[str, ShardWriter] = {}
    resume = resume or {}

    def report() -> None:
        if on_progress is not None:
            on_progress({split: w.saved for split, w in writers.items()})

    def writer(split: str) -> ShardWriter:
        if split not in writers:
            writers[split] = ShardWriter(root / split, tokenizer, shard_tokens,
                                         f"{source} ({split})" if source else split, on_flush=report)
            if split in resume:
                writers[split].load_state_dict(resume[split])
        return writers[split]

    seen: dict[str, int] = {}
    skipped_bytes = 0

    def todo() -> Iterator[tuple[str, int, str]]:
        nonlocal skipped_bytes
        for doc in docs:
            split = doc[2]
            seen[split] = seen.get(split, 0) + 1
            if seen[split] <= int(resume.get(split, {}).get("docs", 0)):
                skipped_bytes += doc[1]
                continue
            yield doc

    def encoded() -> Iterator[tuple[list[tuple[int, str]], list[list[int]]]]:
        if num_workers <= 1:
            for batch in _batches(todo()):
                yield [(nbytes, split) for _, nbytes, split in batch], tokenizer.encode_batch([b[0] for b in batch])
            return
        import multiprocessing as mp

        # The processes are the parallelism; a Rust thread pool in each would only oversubscribe the cores
        # (and tokenizers warns when a process that used its pool forks).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with context.Pool(num_workers, initializer=_worker_init,
                          initargs=(tokenizer.backend.to_str(), tokenizer.eos_token)) as pool:
            yield from pool.imap(_worker_encode, _batches(todo()), chunksize=1)

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
              disable=None, leave=False) as bar:
        for meta, ids in encoded():
            if skipped_bytes:
                bar.update(skipped_bytes)  # resumed: the part done before counts as done
                skipped_bytes = 0
            for (nbytes, split), doc_ids in zip(meta, ids, strict=True):
                writer(split).add(doc_ids, nbytes)
            bar.update(sum(m[0] for m in meta))
    for split in resume:
        writer(split)  # a split whose remaining documents were all done before still closes
    return {split: w.close(root) for split, w in sorted(writers.items())}


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory unless asked: it may hold the user's data."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"Output directory {out_dir} already exists and is not empty. Choose a new --out-dir, or "
                        f"pass --overwrite to replace it.")


PARTIAL_SUFFIX = ".partial"
PROGRESS = "progress.json"


def _signature(files: Sequence[Path], options: dict[str, Any]) -> dict[str, Any]:
    """What a resumable build depends on: the options and every input's path, size and mtime."""
    return {"options": options,
            "inputs": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _open_build_dir(out: Path, signature: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """``OUT.partial`` and the progress of an earlier build of the same signature there (or {})."""
    build = out.with_name(out.name + PARTIAL_SUFFIX)
    if build.is_dir():
        try:
            progress = json.loads((build / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            progress = {}
        same = progress.get("signature") == signature
        if same and (build / "tokenizer.json").is_file():
            done = {k: v["docs"] for k, v in progress.get("splits", {}).items()}
            say(f"prepare: resuming the interrupted build in {build} (documents already in shards: {done})")
            return build, progress
        if same or not progress:
            say(f"prepare: restarting the interrupted build in {build} (it stopped before its tokenizer was saved)")
        else:
            say(f"prepare: discarding {build} (an interrupted build of other inputs or options)")
        shutil.rmtree(build)
    build.mkdir(parents=True)
    return build, {}


def _write_progress(build: Path, progress: dict[str, Any]) -> None:
    tmp = build / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(progress), encoding="utf-8")
    os.replace(tmp, build / PROGRESS)


def _finish_build(build: Path, out: Path, splits: dict[str, dict[str, Any]], overwrite: bool) -> None:
    """Drop the progress file and shards no split lists, then move the build into place."""
    (build / PROGRESS).unlink(missing_ok=True)
    listed = {rel for info in splits.values() for rel in info["shards"]}
    for stale in build.glob("*/shard_*.bin*"):
        if stale.relative_to(build).as_posix() not in listed:
            stale.unlink()
    _check_out_dir(out, overwrite)
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(build, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- one prepare per output
LOCK_SUFFIX = ".lock"
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_AFTER_S = 90.0  # a holder on another host that missed this many seconds of heartbeats is gone
LOCK_UNREADABLE_AFTER_S = 10.0  # an unreadable lock file this old is damaged (e.g. truncated by a crash), not new
_MAX_PID = 2**22  # Linux's pid_max limit; beyond it a "pid" names no process


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. (bigtrain.train.status has the same check; data/ may not import train/.)"""
    if not 0 < pid <= _MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``OUT.lock``: the output of one running ``bigtrain data prepare`` (see the module docstring).

    The lock file is created whole or not at all (a record written beside it, then hard-linked into place; where
    the filesystem has no hard links, ``O_CREAT | O_EXCL``), so a reader never judges a half-written one. It is a
    file, not ``flock``: on shared filesystems flock is often per host, and two nodes may prepare into one folder.
    The holder refreshes its heartbeat every :data:`LOCK_HEARTBEAT_S` seconds in a background thread.
    """

    def __init__(self, out: Path, *, heartbeat_s: float = LOCK_HEARTBEAT_S,
                 stale_after_s: float = LOCK_STALE_AFTER_S) -> None:
        self.out = out
        self.path = out.with_name(out.name + LOCK_SUFFIX)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started, "heartbeat": time.time(),
                           "out": str(self.out)})

    def _scratch(self) -> Path:
        return self.path.with_name(f"{self.path.name}.{self.host}.{self.pid}.tmp")

    def read(self) -> dict[str, Any] | None:
        """The holder's record; None when there is no lock or it names nobody (damaged, wrong types)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        pid = data.get("pid")
        typed = (isinstance(data.get("host"), str) and isinstance(pid, int) and not isinstance(pid, bool)
                 and 0 < pid <= _MAX_PID
                 and all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
                         and math.isfinite(data[k]) for k in ("started", "heartbeat")))
        return data if typed else None

    def _create(self) -> bool:
        """Create the lock file with our record, atomically; False when it exists."""
        scratch = self._scratch()
        scratch.write_text(self._record(), encoding="utf-8")
        try:
            os.link(scratch, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE / SMB mounts): exclusive create, then the record
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self._record())
            return True
        finally:
            scratch.unlink(missing_ok=True)

    def stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why ``holder`` no longer holds the output (None: it does)."""
        if holder is None:
            # Written whole (see the class docstring), except by the O_EXCL fallback: unreadable for a moment there.
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None
            return "its lock file is unreadable" if age > LOCK_UNREADABLE_AFTER_S else None
        host, pid = holder["host"], holder["pid"]
        if host == self.host:  # the process table is the truth here; a busy holder may miss heartbeats
            return None if _process_alive(pid) else f"process {pid} on {host} is not running"
        age = time.time() - float(holder["heartbeat"])
        if age > self.stale_after_s:
            return f"the lock of {host} (pid {pid}) has not been refreshed for {age:.0f}s"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`UserError` naming its holder; starts the heartbeat."""
        try:
            self._take()
        except OSError as exc:  # a read-only or missing place for the output: nothing was written
            raise UserError(f"data prepare: cannot create the output lock {self.path} ({exc.strerror or exc}); "
                            f"choose a writable --out-dir.") from None
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bigtrain-prepare-lock", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another prepare may take over a stale lock between our read and create
            if self._create():
                break
            holder = self.read()
            if holder is None and not self.path.exists():
                continue  # released in the meantime
            if self._ours(holder):
                break  # this process holds it already
            reason = self.stale_reason(holder)
            if reason is None:
                who = (f"host {holder['host']}, pid {holder['pid']}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder['started'])))}"
                       if holder is not None else "its lock record is unreadable: just created, or damaged (remove "
                                                  "the lock file if no prepare is running)")
                raise UserError(
                    f"data prepare: the output folder {str(self.out)!r} is being built by another `bigtrain data "
                    f"prepare` ({who}; lock file {self.path}). Wait for it to finish or stop it, or choose another "
                    f"--out-dir. (A lock whose process no longer runs is taken over by the next prepare.)")
            warn(f"prepare: note: taking over the output lock {self.path} ({reason}); its build in "
                 f"{self.out.name}{PARTIAL_SUFFIX} is resumed if it can be")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            raise UserError(f"data prepare: could not take the output lock {self.path}: other prepares keep taking "
                            f"it; run one `bigtrain data prepare` per --out-dir.")

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        return holder is not None and holder["host"] == self.host and holder["pid"] == self.pid

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours(self.read()):
                return  # taken over (this process looked gone): never write over the new holder's record
            with contextlib.suppress(OSError):  # a full or flaky disk must not stop the build from here
                scratch = self._scratch()
                scratch.write_text(self._record(), encoding="utf-8")
                os.replace(scratch, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        if self._ours(self.read()):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- entry point
def prepare_corpus(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 32000,
    val_fraction: float = 0.01,
    text_key: str = "text",
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int = 0,
) -> Path:
    """Tokenize local documents into `out_dir` (tokenizer.json, train/, val/, manifest.json).

    Whole documents are held out for validation (`val_fraction` of them, chosen with `seed`;
    at least one when there are two or more). Without `tokenizer`, a byte-level BPE of
    `vocab_size` tokens is trained on the training documents only. ``num_workers`` tokenizer
    processes (0 = one per CPU core). An interrupted build resumes when run again.
    """
    out = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be in [0, 1), e.g. 0.01 to hold out 1% of documents.")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be positive (e.g. 100000000).")
    if tokenizer is None and vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it needs at least "
                        f"{MIN_BPE_VOCAB} (256 byte tokens + EOS).")
    if num_workers < 0:
        raise UserError(f"num_workers={num_workers} must be >= 0 (0 = one per CPU core).")
    workers = num_workers or os.cpu_count() or 1
    if not inputs:
        raise UserError("No input files given. Pass text files, directories or globs (e.g. 'corpus/*.jsonl').")
    files = find_files(inputs, owner="data prepare", option="the input paths")
    # The output (and its partial build) may sit inside an input folder: never read it back as input.
    files = [f for f in files if not _is_within(f, out) and not _is_within(f, out.with_name(out.name + PARTIAL_SUFFIX))]
    if not files:
        raise UserError(f"data prepare: the input paths ({', '.join(inputs)}) hold no input files outside the output "
                        f"folder {out}.")
    # Everything from here on reads or writes OUT, OUT.partial: one prepare at a time (before the long scan).
    with OutputLock(out):
        return _prepare_locked(inputs, out, files, tokenizer=tokenizer, vocab_size=vocab_size,
                               val_fraction=val_fraction, text_key=text_key, shard_tokens=shard_tokens, seed=seed,
                               overwrite=overwrite, workers=workers)


def _prepare_locked(inputs: Sequence[str], out: Path, files: list[Path], *, tokenizer: str | None, vocab_size: int,
                    val_fraction: float, text_key: str, shard_tokens: int, seed: int, overwrite: bool,
                    workers: int) -> Path:
    """:func:`prepare_corpus` once the inputs are found and the output is locked."""
    tok = Tokenizer.from_file(tokenizer) if tokenizer is not None else None
    _check_out_dir(out, overwrite)  # before the (long) scan, not only when the build starts
    say(f"prepare: scanning {len(files)} input file(s)")
    stats = ScanStats()
    for _ in iter_documents(files, text_key, stats):
        pass
    if stats.num_docs == 0:
        raise UserError(f"The inputs ({', '.join(inputs)}) contain no non-empty documents "
                        f"({stats.num_empty} empty ones skipped). Check the files and --text-key.")
    if stats.num_invalid_utf8:
        say(f"prepare: replaced {stats.num_invalid_utf8} invalid UTF-8 sequence(s) with U+FFFD")
    n = stats.num_docs
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(n * val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    say(f"prepare: {n} documents, {stats.num_bytes / 1e6:.1f} MB ({stats.num_empty} empty skipped); "
        f"{n_val} held out for validation (seed {seed})")

    def split_docs() -> Iterator[tuple[str, int, str]]:
        for i, (text, nbytes) in enumerate(iter_documents(files, text_key)):
            yield text, nbytes, "val" if is_val[i] else "train"

    signature = _signature(files, {
        "tokenizer": tok.fingerprint if tok is not None else None, "vocab_size": vocab_size, "text_key": text_key,
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens})
    build, progress = _open_build_dir(out, signature)
    try:
        if progress:
            tok = Tokenizer.from_file(build / "tokenizer.json")
        elif tok is None:
            say(f"prepare: training byte-level BPE tokenizer (vocab {vocab_size}) on {n - n_val} train documents")
            tok = Tokenizer.train_bpe_from_iterator(
                (text for text, _, split in split_docs() if split == "train"), vocab_size)
        if not progress:
            tok.save(build / "tokenizer.json")
            _write_progress(build, {"signature": signature, "splits": {}})
        say(f"prepare: tokenizer vocab {tok.vocab_size}, eos {tok.eos_id}, fingerprint {tok.fingerprint}; "
            f"{workers} tokenizer process(es)")
        splits = tokenize_to_shards(
            split_docs(), tok, build, shard_tokens=shard_tokens, total_bytes=stats.num_bytes,
            source="bigtrain data prepare", num_workers=workers, resume=progress.get("splits"),
            on_progress=lambda state: _write_progress(build, {"signature": signature, "splits": state}))
    except UserError:
        shutil.rmtree(build, ignore_errors=True)  # a mistake in the input is not worth resuming
        raise
    except OSError as exc:  # a full disk, a read-only folder: what is written stays, unfinished, for a resume
        where = f" ({exc.filename})" if exc.filename else ""
        raise EnvironmentFailure(
            f"data prepare stopped: {exc.strerror or exc}{where}. Nothing was published at {out}; "
            f"the shards finished so far are kept in {build}. Free space (or fix the folder) and run the same "
            f"command again to resume from there.") from exc
    except BaseException:
        warn(f"prepare: interrupted; run the same command again to resume from {build}")
        raise
    splits.setdefault("val", {"num_docs": 0, "num_tokens": 0, "num_bytes": 0, "shards": []})
    manifest = {
        **manifest_head(tok, str(tokenizer) if tokenizer else f"trained byte-level BPE (vocab {vocab_size})"),
        "splits": splits,
        "inputs": [str(i) for i in inputs],
        "num_input_files": len(files),
        "text_key": text_key,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "num_empty_docs_skipped": stats.num_empty,
        "num_invalid_utf8": stats.num_invalid_utf8,
    }
    write_manifest(build, manifest)
    _finish_build(build, out, splits, overwrite)
    for split, info in splits.items():
        say(f"prepare: {split}: {info['num_docs']} docs, {info['num_tokens']:,} tokens "
            f"in {len(info['shards'])} shard(s)")
    say(f"prepare: done -> {out}")
    return out
