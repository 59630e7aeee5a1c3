"""Save, find, verify and load whole-training-state checkpoints of a run folder.

Layout of one checkpoint (every rank writes its own files; nothing is gathered to rank 0)::

    RUN_DIR/checkpoints/step_000123/
        manifest.json          step, tokens, world size, backend, config (+hash), every file's size and CRC32
        dcp/                   model + optimizer: torch.distributed.checkpoint shards   (single, ddp, fsdp)
        ds/state/              model + optimizer: DeepSpeed's own checkpoint            (zero)
        rank/rank_00000.pt     per-rank data-pipeline state and RNG states (python, numpy, torch, cuda)
        tokenizer.json         the run's tokenizer file (none for the byte-level fallback); its fingerprint and
                               EOS token are in the manifest
    RUN_DIR/checkpoints/latest  name of the newest committed checkpoint

The model + optimizer part is written and read by a checkpoint backend (:mod:`bigtrain.checkpoint.backend`:
``dcp`` or ``deepspeed``, the one the strategy names); this module owns everything around it.

Commit protocol (a crash at any point leaves the previous checkpoint intact and selected):
write everything into ``step_000123.tmp/``; every rank checksums and fsyncs a share of the files;
rank 0 writes ``manifest.json`` (fsynced), renames the folder to ``step_000123``, and only then
replaces ``latest``. Resume trusts ``latest`` and what is older: a folder newer than ``latest``
is a save that crashed before its commit point.

Async saves (``checkpoint.async_save``) pay only the device→host copy into reused host buffers in
the step loop (:mod:`bigtrain.checkpoint.staging`; for ZeRO, DeepSpeed's checkpoint engine is wrapped
to stage instead of write). The file writes, checksums and the commit run in one background thread,
their collectives on a dedicated gloo process group so they never interleave with the training ones.
At most one save is in flight: the next
save, :meth:`CheckpointManager.wait` and the end of ``fit`` wait for it.
"""
from __future__ import annotations

import builtins
import os
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain import messages
from bigtrain.checkpoint.backend import CheckpointBackend, backend_for
from bigtrain.checkpoint.config import CheckpointConfig
from bigtrain.checkpoint.manifest import (
    LATEST_FILE,
    MANIFEST_FILE,
    REPLACED_SUFFIX,
    SCRATCH_PREFIXES,
    TOKENIZER_FILE,
    Manifest,
    ManifestError,
    TokenizerEntry,
    check_files,
    checksum_files,
    fsync_dir,
    list_files,
    read_manifest,
    replaced_step,
    step_dirname,
    step_of,
    write_manifest,
)
from bigtrain.checkpoint.rank_state import (
    RANK_DIR,
    RankStateError,
    load_rank_state,
    rank_file,
    reseed_rng,
    restore_rng,
    save_rank_state,
)
from bigtrain.checkpoint.staging import host_copy
from bigtrain.errors import UserError
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.strategy import Strategy

# Test hook: "before_manifest", "before_rename" or "before_latest", optionally "@STEP": SIGKILL this
# process at that point of the commit (tests/checkpoint/test_resume_kill.py proves recovery).
KILL_ENV = "BIGTRAIN_CHECKPOINT_KILL_AT"


def _kill_point(point: str, step: int) -> None:
    want = os.environ.get(KILL_ENV, "")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


# (data-pipeline state, this rank's RNG state or None for a rank the saved run did not have, the trainer's
# global state: counters and policy windows, the same on every rank)
RankState = tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]


class CheckpointSaveError(Exception):
    """A save failed (disk full, permissions, ...). Its partial folder is gone and ``latest`` still names
    the last committed checkpoint; the message is one paragraph that says so."""


@dataclass(frozen=True)
class RunTokenizer:
    """The run's tokenizer as every checkpoint keeps it (the trainer reads it: this package reads no tokenizers)."""

    fingerprint: str  # bigtrain.data.tokenizer.Tokenizer.fingerprint
    eos_token: str
    content: bytes | None  # the tokenizer file's bytes (saved as tokenizer.json); None: the byte-level fallback

    def entry(self) -> TokenizerEntry:
        return TokenizerEntry(self.fingerprint, self.eos_token, TOKENIZER_FILE if self.content is not None else None)


@dataclass
class Resumed:
    """What a resume restored, for the trainer's counters."""

    path: Path
    step: int
    tokens_seen: int
    data_state: dict[str, Any]
    trainer_state: dict[str, Any] = field(default_factory=dict)  # the saved ``trainer`` entry (policy windows)


class CheckpointManager:
    """The checkpoints of one run folder: save (sync or async), retention, selection, verification, load."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig | None = None, *, info: DistInfo | None = None,
                 keep_last: int | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg or CheckpointConfig()
        self.keep_last = keep_last if keep_last is not None else self.cfg.keep_last
        self.rank = info.rank if info else 0
        self.world_size = info.world_size if info else 1
        self._pg: Any = None
        self._pg_ready = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._backend: CheckpointBackend | None = None  # created on first use (it keeps async-save buffers)

    def backend(self, strategy: Strategy) -> CheckpointBackend:
        """This run's checkpoint backend (the format ``strategy`` saves in)."""
        if self._backend is None or self._backend.format != strategy.checkpoint_format:
            self._backend = backend_for(strategy.checkpoint_format)
        return self._backend

    # ------------------------------------------------------------------ collectives (dedicated group)
    def _group(self) -> Any | None:
        """A gloo group of all ranks for checkpoint traffic (None for one process); created on first use, on every
        rank."""
        if not self._pg_ready:
            import torch.distributed as dist

            if self.world_size > 1 and dist.is_available() and dist.is_initialized():
                self._pg = dist.new_group(backend="gloo")
            self._pg_ready = True
        return self._pg

    def _barrier(self) -> None:
        if self._pg is not None:
            import torch.distributed as dist

            dist.barrier(group=self._pg)

    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank on every rank (world of one: [obj])."""
        if self._pg is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
             rank_state: dict[str, Any],
             tokens_seen: int, config: dict[str, Any], config_hash: str, blocking: bool | None = None,
             tokenizer: RunTokenizer | None = None) -> Path:
        """Checkpoint ``step`` on every rank (collective). Returns when the step loop may continue:
        after the host copy for async DCP saves, after the commit otherwise. ``tokenizer`` (rank 0's counts):
        its file is written as ``tokenizer.json`` and its fingerprint recorded in the manifest."""
        self.wait()  # at most one save in flight; surfaces a failed background save
        pg = self._group()
        final = self.root / step_dirname(step)
        tmp = self.root / (step_dirname(step) + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANK_DIR).mkdir(parents=True)
        self._barrier()
        meta = {"step": step, "tokens_seen": tokens_seen, "config": config, "config_hash": config_hash,
                "backend": strategy.checkpoint_format, "strategy": str(config.get("parallel", {}).get("strategy", "")),
                "extra": {}, "tokenizer": tokenizer}
        use_async = self.cfg.async_save if blocking is None else not blocking
        try:
            # Async: the backend only copies the state to host memory here; the job writes the files later.
            job = self.backend(strategy).save(strategy, model, optimizer, tmp, staged=use_async, process_group=pg)
            meta["extra"] = job.extra
            write = job.write
            if not use_async:
                write()
                self._finish(tmp, final, rank_state, meta)
                return final
        except Exception as exc:
            raise self._failed(step, tmp, exc) from exc
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        rank_state = host_copy(rank_state)
        self._thread = threading.Thread(target=self._run_background, args=(write, tmp, final, rank_state, meta),
                                        name=f"bigtrain-checkpoint-{step}", daemon=False)
        self._thread.start()
        return final

    def _run_background(self, write: Callable[[], None], tmp: Path, final: Path, rank_state: dict[str, Any],
                        meta: dict[str, Any]) -> None:
        try:
            write()
            self._finish(tmp, final, rank_state, meta)
        except BaseException as exc:  # re-raised in the main thread by wait()
            self._error = self._failed(int(meta["step"]), tmp, exc)
            self._error.__cause__ = exc

    def _failed(self, step: int, tmp: Path, exc: BaseException) -> CheckpointSaveError:
        """Remove what a failed save wrote and describe the failure in one paragraph."""
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = _root_os_error(exc)
        if os_error is not None:
            reason = str(os_error.strerror) + (f" ({os_error.filename})" if os_error.filename else "")
        else:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        pointer = self.root / LATEST_FILE
        committed = [p.name for p in self.list()]
        final = self.root / step_dirname(step)
        if pointer.exists() and not pointer.is_file():
            kept = (f"{pointer} is not a file, so it cannot name the newest checkpoint: remove it (resume then takes "
                    f"the newest complete folder). Committed: {', '.join(committed) or 'none'}")
        elif (final / MANIFEST_FILE).is_file():
            latest = self.latest_pointer()
            kept = (f"{final} is complete on disk, but {pointer} still names "
                    f"{latest.name if latest is not None else 'nothing'}")
        else:
            latest = self.latest_pointer()
            kept = (f"its partial folder {tmp} was removed and "
                    + (f"{pointer} still names {latest.name}" if latest is not None
                       else "no checkpoint of this run was committed before"))
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} failed: {reason}. {kept[0].upper() + kept[1:]}. Fix the cause "
            f"(free disk space, check permissions and quotas on {self.root}) and resume with checkpoint.resume=auto.")

    def _finish(self, tmp: Path, final: Path, rank_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Per-rank files, distributed checksums, then rank 0 commits (manifest → rename → latest → prune)."""
        save_rank_state(tmp / rank_file(self.rank), rank_state)
        tokenizer: RunTokenizer | None = meta.get("tokenizer")
        if self.rank == 0 and tokenizer is not None and tokenizer.content is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer.content)  # listed, checksummed and fsynced below
        self._barrier()  # every rank's files are written
        names = list_files(tmp)
        sums = checksum_files(tmp, names[self.rank::self.world_size])  # also fsyncs this rank's share
        files: dict[str, dict[str, Any]] = {}
        for part in self._gather(sums):
            files.update(part)
        if self.rank == 0:
            self._commit(tmp, final, files, meta)
        self._barrier()  # the commit is visible to every rank before its wait() returns

    def _commit(self, tmp: Path, final: Path, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
        step = int(meta["step"])
        _kill_point("before_manifest", step)
        manifest = Manifest(step=step, tokens_seen=int(meta["tokens_seen"]), world_size=self.world_size,
                            backend=meta["backend"], strategy=meta["strategy"], config_hash=meta["config_hash"],
                            config=meta["config"], files=files, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            extra=meta["extra"],
                            tokenizer=meta["tokenizer"].entry() if meta.get("tokenizer") is not None else None)
        for sub in {Path(name).parent for name in files}:
            fsync_dir(tmp / sub)
        write_manifest(tmp, manifest)
        _kill_point("before_rename", step)
        aside = final.with_name(final.name + REPLACED_SUFFIX)
        if final.exists():
            # Re-saving a step (a resume from an older checkpoint, or of a finished run): move the committed
            # folder aside in one rename, never delete it first, so a kill at any point leaves a committed
            # folder for this step (candidates() takes an aside folder whose final name is missing).
            if aside.exists():  # left by an earlier re-save killed after its rename: final is newer
                shutil.rmtree(aside)
            os.replace(final, aside)
            fsync_dir(self.root)
            _kill_point("after_aside", step)
        os.replace(tmp, final)
        fsync_dir(self.root)
        _kill_point("before_latest", step)
        latest_tmp = self.root / (LATEST_FILE + ".tmp")
        with open(latest_tmp, "w") as fh:
            fh.write(final.name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(latest_tmp, self.root / LATEST_FILE)
        fsync_dir(self.root)
        _kill_point("before_drop_aside", step)
        shutil.rmtree(aside, ignore_errors=True)
        self.prune(current=step)

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def in_flight(self) -> bool:
        """An async save was started and not yet waited for (it may already have finished)."""
        return self._thread is not None

    # ------------------------------------------------------------------ retention
    def prune(self, current: int) -> list[Path]:
        """Delete committed checkpoints beyond ``keep_last`` that are not ``keep_every_steps`` milestones,
        and leftovers of crashed saves; never the one just committed. Returns what was deleted."""
        committed = self.list()
        keep = set(committed[-self.keep_last:])
        every = self.cfg.keep_every_steps
        deleted = []
        for path in committed:
            step = step_of(path)
            if path in keep or step == current or (every and step is not None and step % every == 0):
                continue
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
        for stale in self.root.glob("step_*.tmp"):
            if stale.name != step_dirname(current) + ".tmp":
                shutil.rmtree(stale, ignore_errors=True)
        names = {p.name for p in committed}
        for aside in self.root.glob("step_*" + REPLACED_SUFFIX):  # its step was committed again since
            if aside.name[:-len(REPLACED_SUFFIX)] in names:
                shutil.rmtree(aside, ignore_errors=True)
        return deleted

    # ------------------------------------------------------------------ find
    def list(self) -> builtins.list[Path]:
        """Folders that look committed (final name + manifest), oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and step_of(p) is not None and (p / MANIFEST_FILE).is_file()]
        return sorted(dirs, key=lambda p: step_of(p) or 0)

    def latest_pointer(self) -> Path | None:
        pointer = self.root / LATEST_FILE
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.root / name if name else None

    def candidates(self) -> builtins.list[Path]:
        """Committed checkpoints a resume may use, newest first: ``latest`` and older ones.

        A folder newer than ``latest`` lost its save before the commit point and is ignored.
        """
        pointer = self.latest_pointer()
        limit = step_of(pointer) if pointer is not None else None
        dirs = [p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None] if self.root.is_dir() else []
        # A re-save killed between its two renames left the committed folder aside, under no final name.
        steps = {p: step_of(p) or 0 for p in dirs}
        if self.root.is_dir():
            for aside in self.root.glob("step_*" + REPLACED_SUFFIX):
                step = replaced_step(aside)
                if step is not None and aside.is_dir() and step not in steps.values():
                    steps[aside] = step
        if limit is not None:
            steps = {p: s for p, s in steps.items() if s <= limit}
        return sorted(steps, key=lambda p: steps[p], reverse=True)

    def latest(self, *, checksums: bool = False, report: Callable[[str], None] | None = None) -> Path | None:
        """Newest candidate whose manifest and files check out (sizes; with ``checksums`` also CRC32)."""
        for path in self.candidates():
            _, problems = verify(path, checksums=checksums)
            if not problems:
                return path
            if report:
                report(f"checkpoint {path} skipped: " + "; ".join(problems))
        return None

    # ------------------------------------------------------------------ load
    def verify_distributed(self, path: Path) -> tuple[Manifest | None, builtins.list[str]]:
        """Full check (sizes + CRC32) with the files split over the ranks (collective when distributed)."""
        try:
            manifest = read_manifest(path)
        except ManifestError as exc:
            return None, [str(exc)]
        names = sorted(manifest.files)
        mine = check_files(path, manifest.files, names[self.rank::self.world_size])
        if self.rank == 0:  # the same on every rank: reported once
            mine = structure_problems(path, manifest) + mine
        problems = [p for part in self._gather(mine) for p in part]
        return manifest, problems

    def load(self, path: Path, *, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
             current_config: dict[str, Any], seed: int, auto: bool,
             config_defaults: dict[str, Any] | None = None) -> Resumed | None:
        """Verify and load ``path``; with ``auto``, fall back to older checkpoints when one fails verification
        or loading (saying why). Returns the counters and data state (None: nothing usable, start fresh).

        A changed architecture or another checkpoint format is refused outright (every older checkpoint
        of the run would be refused for the same reason). ``config_defaults`` (the default config) stands in
        for keys an older checkpoint's config lacks."""
        self._group()
        chain = [path] + ([p for p in self.candidates() if (step_of(p) or 0) < (step_of(path) or 0)] if auto else [])
        for candidate in chain:
            manifest, problems = self.verify_distributed(candidate)
            what = "is corrupt or incomplete"
            if not problems and manifest is not None:
                what = "could not be loaded"
                self._check_compatible(candidate, manifest, strategy, current_config, config_defaults)
                problems, rank_state = self._load_one(candidate, manifest, strategy, model, optimizer)
                if rank_state is not None:
                    data_state, rng, trainer_state = rank_state
                    if rng is not None:
                        restore_rng(rng)
                    else:
                        reseed_rng(seed, manifest.step, self.rank)
                    return Resumed(candidate, manifest.step, manifest.tokens_seen, data_state, trainer_state)
            message = f"checkpoint {candidate} {what}: " + "; ".join(problems)
            if not auto:
                raise UserError(message + ". Pass another checkpoint to checkpoint.resume (see `bigtrain ckpt ls`).")
            messages.warn(f"warning: {message}; skipping it")
        messages.warn("warning: no checkpoint verified; starting from scratch")
        return None

    def _check_compatible(self, candidate: Path, manifest: Manifest, strategy: Strategy,
                          current_config: dict[str, Any], config_defaults: dict[str, Any] | None = None) -> None:
        check_config(candidate, manifest.config, current_config, config_defaults)
        if manifest.backend != strategy.checkpoint_format:
            raise UserError(
                f"cannot resume from {candidate}: it was saved by parallel.strategy={manifest.strategy} "
                f"({manifest.backend} format) and this run uses parallel.strategy="
                f"{current_config['parallel']['strategy']} ({strategy.checkpoint_format} format). Resume with "
                f"parallel.strategy={manifest.strategy}, or export it (`bigtrain export {candidate} --to hf OUT`) "
                f"and start a new run with model.init_from=OUT."
            )

    def _load_one(self, candidate: Path, manifest: Manifest, strategy: Strategy, model: nn.Module,
                  optimizer: torch.optim.Optimizer) -> tuple[builtins.list[str], RankState | None]:
        """Load model + optimizer and this rank's per-rank files: (the problems of every rank, this rank's
        state, None unless every rank loaded). All ranks agree, so they all fall back together."""
        problems: builtins.list[str] = []
        rank_state: RankState | None = None
        try:
            self.backend(strategy).load(strategy, model, optimizer, candidate, saved_world_size=manifest.world_size,
                                        process_group=self._pg)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            first = " ".join(str(exc).split())[:300]
            problems.append(f"loading its {manifest.backend} files failed ({type(exc).__name__}: {first})")
        try:
            rank_state = self._rank_state(candidate, manifest)
        except RankStateError as exc:
            problems.append(str(exc))
        # Ranks often fail for the same reason: each distinct problem once, in rank order.
        everyone = list(dict.fromkeys(p for part in self._gather(problems) for p in part))
        return everyone, (rank_state if not everyone else None)

    def _rank_state(self, candidate: Path, manifest: Manifest) -> RankState:
        """(data-pipeline state, this rank's RNG state or None for a rank the saved run did not have, the
        trainer's global state)."""
        own = candidate / rank_file(self.rank)
        same_world = manifest.world_size == self.world_size
        # The data position is global (a function of the sample index): rank 0's serves any world size;
        # so does the trainer's entry (counters, the loss-spike window: values every rank shares).
        shared = load_rank_state(own if same_world else candidate / rank_file(0))
        rng = load_rank_state(own)["rng"] if self.rank < manifest.world_size else None
        return shared["data"], rng, dict(shared.get("trainer", {}))


def structure_problems(ckpt: Path, manifest: Manifest) -> builtins.list[str]:
    """Disk and manifest compared in both directions, and the files this backend and world size need.

    Catches what per-file checks cannot: a file added after the commit, or a shard deleted together
    with its manifest entry (the manifest and the disk then agree, but the checkpoint is incomplete).
    Which files a format needs is the backend's knowledge (``CheckpointBackend.required_files``).
    """
    problems = []
    listed = set(manifest.files)
    on_disk = {name for name in list_files(ckpt) if not name.startswith(SCRATCH_PREFIXES)}
    problems += [f"{ckpt / name}: on disk but not in the manifest (added after the commit?)"
                 for name in sorted(on_disk - listed)]
    required = {rank_file(rank) for rank in range(manifest.world_size)}
    if manifest.tokenizer is not None and manifest.tokenizer.file is not None:
        required.add(manifest.tokenizer.file)
    try:
        required |= backend_for(manifest.backend).required_files(ckpt, manifest)
    except Exception as exc:  # any failure to read the backend's index is a verification problem
        problems.append(f"{ckpt}: the {manifest.backend} index cannot be read ({type(exc).__name__}: {exc})")
    problems += [f"{ckpt / name}: needed by this checkpoint but not in the manifest"
                 for name in sorted(required - listed)]
    return problems


def verify(ckpt: Path, *, checksums: bool = True) -> tuple[Manifest | None, builtins.list[str]]:
    """(manifest or None, problems) for one checkpoint folder; no problems means it is whole."""
    try:
        manifest = read_manifest(ckpt)
    except ManifestError as exc:
        return None, [str(exc)]
    return manifest, structure_problems(ckpt, manifest) + check_files(ckpt, manifest.files, checksums=checksums)


def _root_os_error(exc: BaseException) -> OSError | None:
    """The operating-system error behind a failed save, if any: also through exception chains and through DCP's
    CheckpointException, whose ``failures`` map each rank to its writer thread's exception (its message is only
    a flattened traceback), so a full disk reads "No space left on device"."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        item = pending.pop(0)
        if isinstance(item, tuple):  # DCP keeps (exception, traceback) pairs
            pending.extend(x for x in item if isinstance(x, BaseException))
            continue
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item
        failures = getattr(item, "failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
        pending.extend(x for x in (item.__cause__, item.__context__) if x is not None)
    if "No space left on device" in str(exc):
        return OSError(28, "No space left on device")
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "extra":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _model_key_classes() -> tuple[set[str], set[str]]:
    """(model keys a resume ignores: where the model came from; model keys that are training settings: a resume
    may change them, reported). Every other model key is architecture (bigtrain.model.config says which)."""
    from bigtrain.model.config import PROVENANCE_FIELDS, TRAINING_FIELDS

    return {f"model.{k}" for k in PROVENANCE_FIELDS}, {f"model.{k}" for k in TRAINING_FIELDS}


# Sections whose changes are allowed on resume, with a warning.
_WARN_SECTIONS = ("train.", "data.")
_OPTIMIZER_KEY = "train.optimizer"  # ...except this one: the optimizer state would not fit


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(architecture differences, optimizer/LR/data differences) as 'key: old -> new' lines.

    A key the saved config lacks was added to bigtrain after the checkpoint was written: that run
    trained with the key's default (``defaults``, the full default config), so it compares as that."""
    a, b = _flatten(saved), _flatten(current)
    for key, value in _flatten(defaults or {}).items():
        a.setdefault(key, value)
    arch, soft = [], []
    ignored, training = _model_key_classes()
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key in ignored:
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        if key in training:
            soft.append(line)
        elif key.startswith("model."):
            arch.append(line)
        elif key.startswith(_WARN_SECTIONS):
            soft.append(line)
    return arch, soft


def check_config(path: Path, saved: dict[str, Any], current: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> None:
    """Refuse a changed architecture (listing the keys) or optimizer; warn about changed LR/data settings."""
    arch, soft = config_changes(saved, current, defaults)
    switched = [line for line in soft if line.startswith(_OPTIMIZER_KEY + ":")]
    if switched:
        raise UserError(f"cannot resume from {path}: the optimizer changed ({switched[0]}); its saved state "
                        "(moments, momentum buffers) belongs to the old one. Resume with the checkpoint's "
                        "train.optimizer, or start a new run folder from its weights (`bigtrain export` + "
                        "model.init_from).")
    if arch:
        raise UserError(f"cannot resume from {path}: the model architecture changed:\n  " + "\n  ".join(arch) +
                        "\nUse the checkpoint's model settings, or start a new run folder "
                        "(optionally from its weights: `bigtrain export` + model.init_from).")
    if soft:
        messages.warn("warning: resuming with changed settings (the new values apply from here on):\n  "
                      + "\n  ".join(soft))


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Turn ``checkpoint.resume`` (auto | never | PATH) into a checkpoint folder or None.

    This is the cheap pass (manifest + file sizes) every rank runs before the process group
    exists; the trainer's resume then verifies checksums, split over the ranks.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return CheckpointManager(run_dir).latest(report=messages.warn)
    return find_checkpoint(resume, f"checkpoint.resume={resume!r}", other_choices=", 'auto' or 'never'")


def find_checkpoint(source: str | Path, label: str, *, other_choices: str = "") -> Path:
    """``source`` itself when it is a committed checkpoint folder, else the newest good checkpoint of the run
    folder ``source``. ``label`` starts each error (a tool's name, or the config key that named ``source``)."""
    path = Path(source).expanduser()
    choices = f"a checkpoint folder (…/checkpoints/step_N), a run folder that has checkpoints{other_choices}"
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.is_dir() and step_of(path) is not None:
        raise UserError(f"{label}: {path / MANIFEST_FILE} is missing, so this checkpoint was never committed (or "
                        f"was damaged); pass an older checkpoint or the run folder (see `bigtrain ckpt ls`).")
    found = CheckpointManager(path).latest(report=messages.warn) if path.is_dir() else None
    if found is None:
        what = "holds no committed checkpoint" if path.exists() else "does not exist"
        raise UserError(f"{label}: {str(path)!r} {what}; pass {choices}.")
    return found


def load_model_weights(path: Path, *, as_fp32: bool = True) -> tuple[dict[str, torch.Tensor], Manifest]:
    """Full model weights of any checkpoint (DCP or DeepSpeed), in one CPU process, and its manifest; in fp32
    unless ``as_fp32`` is false (then as saved: fp64 for a train.precision=fp64 run)."""
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        raise UserError(f"{exc}; pass a committed checkpoint folder (…/checkpoints/step_N) or a run folder.") from None
    weights = backend_for(manifest.backend).read_full_weights(path)
    if not as_fp32:
        return weights, manifest
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, manifest


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{"model": full weights, "config": resolved config} of a checkpoint (for generation)."""
    weights, manifest = load_model_weights(path)
    return {"model": {k: v.to(map_location) for k, v in weights.items()}, "config": manifest.config,
            "trainer": {"step": manifest.step, "tokens_seen": manifest.tokens_seen}}
