"""The training loop. ``Trainer.train_step`` is the whole step on one screen; the rest is set-up,
evaluation, checkpointing and logging hung around it.

The trainer talks to a :class:`~bigtrain.parallel.strategy.Strategy` only, so it has no
branches per backend.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigtrain import messages
from bigtrain.checkpoint.manager import CheckpointManager, RunTokenizer, resolve_resume
from bigtrain.checkpoint.rank_state import capture_rng
from bigtrain.data.batches import TokenStream, eval_batches
from bigtrain.data.pipeline import DataPipeline
from bigtrain.data.tokenizer import load_tokenizer, tokenizer_file
from bigtrain.errors import UserError
from bigtrain.kernels.reference import acc_dtype
from bigtrain.model import build_on_meta, count_parameters, flops_per_token
from bigtrain.model.moe import MoEStats, moe_layers, moe_metrics, update_router_biases
from bigtrain.optim.muon import build_muon
from bigtrain.optim.optimizer import build_adamw
from bigtrain.optim.schedule import LRSchedule
from bigtrain.parallel import dist
from bigtrain.parallel.strategy import MicroBatch, OptimizerFactory, build_strategy
from bigtrain.train import peers
from bigtrain.train.config import TrainConfig
from bigtrain.train.failures import NonFiniteGuard, Watchdog
from bigtrain.train.fault_injection import install_loss_poison, install_loss_spike
from bigtrain.train.loggers import (
    ConsoleLogger,
    JsonlLogger,
    Logger,
    StatusLogger,
    TensorBoardLogger,
    WandbLogger,
    preflight,
)
from bigtrain.train.metrics import bits_per_byte, memory_gib, memory_stats, mfu, peak_flops
from bigtrain.train.profiler import ProfilerWindow
from bigtrain.train.run_config import RunConfig
from bigtrain.train.run_lock import RunLock
from bigtrain.train.signals import StopRequest
from bigtrain.train.spikes import SpikeGuard
from bigtrain.train.status import write_status
from bigtrain.train.timing import StepTimer


def _read_tokenizer_file(path: str) -> bytes | None:
    """The bytes of the tokenizer file ``data.tokenizer`` names (None for the byte-level fallback)."""
    file = tokenizer_file(path)
    if file is None:
        return None
    try:
        return file.read_bytes()
    except OSError as exc:
        raise UserError(f"data.tokenizer={path!r}: cannot read {file} ({exc.strerror or exc}).") from None


def optimizer_factory(t: TrainConfig) -> OptimizerFactory:
    """``train.optimizer``: AdamW, or Muon for the block matrices + AdamW for the rest (one optimizer object)."""
    if t.optimizer == "muon":
        mu = t.muon
        return lambda m: build_muon(m, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                    eps=t.adam_eps, momentum=mu.momentum, nesterov=mu.nesterov,
                                    ns_steps=mu.ns_steps, adamw_lr=mu.adamw_lr)
    return lambda m: build_adamw(m, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.adam_eps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds every component of a run from its config and trains it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.loggers: list[Logger] = []  # rank 0's, built last (a failed start closes what it opened)
        self._previous_sink: messages.Sink | None = None
        self._sink_installed = False
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        self.info = dist.init(cfg.run.device)
        seed_everything(cfg.run.seed)

        # --- Everything a user can get wrong is checked before the run folder is touched.
        # W&B credentials first: `online` without a key must fail in seconds, never mid-run.
        self.wandb_mode = preflight(cfg) if self.info.is_main else "disabled"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"the tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size to at least {self.tokenizer.vocab_size} "
                f"(a multiple of 64 such as {64 * math.ceil(self.tokenizer.vocab_size / 64)} is fastest)."
            )
        fingerprint = self.tokenizer.fingerprint
        # Every checkpoint keeps the tokenizer (file, fingerprint, EOS): generate and export never depend on
        # data.tokenizer resolving, relative to wherever they run, to the same file.
        self.run_tokenizer = RunTokenizer(fingerprint, self.tokenizer.eos_token,
                                          _read_tokenizer_file(cfg.data.tokenizer))
        self.val_stream = (TokenStream.open(cfg.data.val_path, vocab_size=cfg.model.vocab_size,
                                            tokenizer_fingerprint=fingerprint, what="validation")
                           if cfg.data.val_path else None)
        # Tensor/context-parallel peers read the same batches: the data pipeline sees data-parallel ranks only.
        self.data_world = cfg.parallel.data_parallel_size(self.info.world_size)
        self.data_rank = cfg.parallel.data_parallel_rank(self.info.rank, self.info.world_size)
        self._check_val_split()
        self.global_batch_seqs, self.accum_steps = cfg.check_launch(self.info.world_size)
        self.loader = DataPipeline.from_config(
            cfg.data, tokenizer=self.tokenizer, vocab_size=cfg.model.vocab_size,
            micro_batch_size=cfg.train.micro_batch_size, global_batch_seqs=self.global_batch_seqs,
            rank=self.data_rank, world_size=self.data_world, seed=cfg.run.seed,
            pin_memory=self.info.device.type == "cuda",
        )
        self.run_dir = Path(cfg.run.out_dir)
        self.resume_from = resolve_resume(cfg.checkpoint.resume, self.run_dir)
        self.run_lock = RunLock(self.run_dir)
        created = self._prepare_run_dir()  # the folder exists and is ours (rank 0 holds its lock)
        try:
            self._build(cfg)
        except BaseException:
            # A failed start changes nothing: the lock goes, and a folder this start created goes too.
            self._abandon_run_dir(created)
            raise
        if self.info.is_main:  # only now: a refused resume never overwrites the run's config.yaml
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

    def _build(self, cfg: RunConfig) -> None:
        """Process group, model, optimizer, checkpoints, guards, loggers; then the resume."""
        dist.init_process_group(self.info, dist.resolve_backend(cfg.parallel.backend, self.info.device),
                                cfg.parallel.timeout_s)

        # --- Model: built on meta, placed/sharded/initialized by the strategy.
        t = cfg.train
        self.strategy = build_strategy(cfg.parallel, self.info, precision=t.precision,
                                       compile=t.compile and t.compile_backend,
                                       micro_batch_size=t.micro_batch_size, grad_clip=t.grad_clip,
                                       accum_steps=self.accum_steps)
        self.model, self.optimizer = self.strategy.wrap(build_on_meta(cfg.model, self.strategy.master_dtype),
                                                        optimizer_factory(t),
                                                        seed=cfg.run.seed)
        self.schedule = LRSchedule(t.lr_schedule, t.lr, t.lr_warmup_steps, t.max_steps, t.min_lr_ratio,
                                   t.lr_decay_fraction)
        self.byte_lengths = torch.from_numpy(self.tokenizer.token_byte_lengths()).to(self.info.device)
        self.num_params = count_parameters(cfg.model)
        self.num_active_params = count_parameters(cfg.model, active=True)
        # MoE: the routing statistics and the router-bias update after each optimizer step (model/moe.py).
        decoder = self.strategy.unwrap(self.model)
        self.moe_stats: MoEStats | None = getattr(decoder, "moe_stats", None)
        self.moe_layers = moe_layers(self.model) if self.moe_stats is not None else []
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.info.device)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, info=self.info)
        self.last_checkpoint_stall_s = 0.0
        self._saved_step: int | None = None  # the step the final save committed (a late stop need not save again)
        self._uncommitted: dict[str, Any] | None = None  # the record of the async save in flight
        if cfg.model.init_from and self.resume_from is None:  # continued pretraining from HF Llama weights
            from bigtrain.checkpoint.hf import init_from_hf

            init_from_hf(cfg.model.init_from, cfg.model, self.strategy, self.model)
        self.step = 0
        self.tokens_seen = 0
        self.timer = StepTimer(self.info.device)
        self._init_fault_tolerance()
        self._build_loggers()
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # ------------------------------------------------------------------ set-up helpers
    def _build_loggers(self) -> None:
        """Rank 0 logs (console, metrics.jsonl, status.json, W&B, TensorBoard) and profiles."""
        cfg, resumed = self.cfg, self.resume_from is not None
        self.console: ConsoleLogger | None = None
        self.status: StatusLogger | None = None
        self.profiler: ProfilerWindow | None = None
        if not self.info.is_main:
            return
        self.loggers.append(JsonlLogger(self.run_dir / "metrics.jsonl"))
        self.status = StatusLogger(self.run_dir, name=cfg.run.name, max_steps=cfg.train.max_steps, resumed=resumed)
        self.loggers.append(self.status)
        if cfg.log.console:
            self.console = ConsoleLogger(cfg.train.max_steps, stream=None)
            self.loggers.append(self.console)
            if self.console.tty:  # messages print above the progress bar (restored when fit ends)
                self._previous_sink = messages.set_sink(self.console.wrap_echo(print))
                self._sink_installed = True
        if self.wandb_mode != "disabled":
            self.loggers.append(WandbLogger(self.run_dir, cfg, self.wandb_mode, resumed=resumed))
        if cfg.log.tensorboard:
            self.loggers.append(TensorBoardLogger(self.run_dir, cfg))
        if cfg.log.profile.steps:
            self.profiler = ProfilerWindow(cfg.log.profile.steps, self.run_dir, self.info.device)

    def _check_val_split(self) -> None:
        """The validation split must hold one evaluation batch per data-parallel rank (found now, not after
        training)."""
        cfg = self.cfg
        if self.val_stream is None or not (cfg.eval.every_steps or cfg.eval.at_end):
            return
        seq, micro, world = cfg.data.seq_len, cfg.train.micro_batch_size, self.data_world
        batches = (self.val_stream.num_tokens - 1) // seq // micro
        if batches < world:
            need = world * micro * seq + 1
            raise UserError(
                f"the validation split {cfg.data.val_path} has {self.val_stream.num_tokens:,} tokens, fewer than one "
                f"evaluation batch per rank ({world} x micro_batch_size {micro} x seq_len {seq} + 1 = {need:,} "
                f"tokens); add validation data, lower train.micro_batch_size, or set data.val_path: ''."
            )

    def _prepare_run_dir(self) -> bool:
        """Create (or check) the run folder and take its lock; True when this start created the folder."""
        existed = self.run_dir.exists()
        # Every rank probes with its own file: a shared name let one rank unlink the probe another
        # rank had just written (its unlink then failed with ENOENT on a perfectly writable folder).
        probe = self.run_dir / f".write-test.{self.info.rank}.{os.getpid()}"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            if not existed:
                # Only an empty folder is removed: other ranks may already be writing into it.
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise UserError(
                f"cannot write to the run folder {str(self.run_dir)!r} ({exc.strerror or exc}); "
                f"set run.out_dir to a writable location."
            ) from None
        if self.info.is_main:
            try:
                self.run_lock.acquire()
            except BaseException:
                if not existed:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise
        return not existed

    def _abandon_run_dir(self, created: bool) -> None:
        """Undo :meth:`_prepare_run_dir` after a failed start (rank 0; other ranks wrote nothing that stays)."""
        for logger in self.loggers:
            with contextlib.suppress(Exception):
                logger.close()
        self.run_lock.release()
        self._restore_message_sink()
        if created and self.info.is_main:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _restore_message_sink(self) -> None:
        if self._sink_installed:
            messages.set_sink(self._previous_sink)
            self._sink_installed = False

    def _resume(self, path: Path) -> None:
        """Restore model, optimizer, data position, RNG and counters (checksums verified first; with
        ``checkpoint.resume=auto`` a corrupt checkpoint is reported and an older one used)."""
        resumed = self.checkpoints.load(path, strategy=self.strategy, model=self.model, optimizer=self.optimizer,
                                        current_config=self.cfg.to_dict(), seed=self.cfg.run.seed,
                                        auto=self.cfg.checkpoint.resume == "auto",
                                        config_defaults=type(self.cfg)().to_dict())
        if resumed is None:
            return
        self.loader.load_state_dict(resumed.data_state)
        self.step, self.tokens_seen = resumed.step, resumed.tokens_seen
        if "spikes" in resumed.trainer_state:  # older checkpoints have none: the window warms up again
            self.spikes.load_state_dict(resumed.trainer_state["spikes"])
        self.resume_from = resumed.path
        messages.say(f"resumed from {resumed.path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def state_dict(self) -> dict[str, Any]:
        """This rank's small state next to the model/optimizer shards: data position, RNG, counters."""
        return {
            "data": self.loader.state_dict(),
            "rng": capture_rng(),
            # The loss-spike window decides the next steps' updates, so it travels with the run.
            "trainer": {"step": self.step, "tokens_seen": self.tokens_seen, "spikes": self.spikes.state_dict()},
        }

    def save_checkpoint(self, *, blocking: bool | None = None) -> Path:
        """Checkpoint the current step on every rank (the single entry point; collective).

        With ``checkpoint.async_save`` it returns once the state is copied to host memory and the
        files are written in the background (``self.checkpoints.wait()`` waits for the commit);
        ``blocking=True`` returns after the commit. The time the loop was blocked is logged as
        ``checkpoint_stall_s`` and kept in ``self.last_checkpoint_stall_s``.
        """
        self.nonfinite.check("before saving a checkpoint")  # a poisoned state is never written
        self._wait_for_checkpoint()
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.step, strategy=self.strategy, model=self.model, optimizer=self.optimizer,
                                     rank_state=self.state_dict(), tokens_seen=self.tokens_seen,
                                     config=self.cfg.to_dict(), config_hash=self.cfg.hash(), blocking=blocking,
                                     tokenizer=self.run_tokenizer)
        stall = time.perf_counter() - t0
        self.last_checkpoint_stall_s = stall
        background = self.checkpoints.in_flight
        record = {"kind": "checkpoint", "step": self.step, "path": str(path), "checkpoint_stall_s": stall,
                  "async": background}
        if background:
            self._uncommitted = record  # logged (status.json included) once committed: never a failed save
        else:
            self._emit(record)
        messages.say(f"{'saving' if background else 'saved'} checkpoint {path} (step loop blocked {stall:.2f}s)")
        return path

    def _wait_for_checkpoint(self) -> None:
        """Wait for the async save in flight (its failure raises :class:`CheckpointSaveError` here), then log it."""
        self.checkpoints.wait()
        if self._uncommitted is not None:
            record, self._uncommitted = self._uncommitted, None
            self._emit(record)

    # ------------------------------------------------------------------ fault tolerance (train/signals.py, failures.py)
    def _init_fault_tolerance(self) -> None:
        cfg = self.cfg
        # (skip + ZeRO is rejected by RunConfig.validate: DeepSpeed's norm comes too late to skip the step.)
        self.nonfinite = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_consecutive_skips, self.info.device)
        # (skip + ZeRO is rejected too: same reason.) Judged after the non-finite policy, from the same values.
        self.spikes = SpikeGuard(cfg.train.on_spike, cfg.train.spike_window, cfg.train.spike_sigma, self.info.device)
        install_loss_poison(self.strategy.unwrap(self.model), cfg.train.debug_poison_steps, lambda: self.step + 1)
        install_loss_spike(self.strategy.unwrap(self.model), cfg.train.debug_spike_steps, lambda: self.step + 1)
        backend = dist.resolve_backend(cfg.parallel.backend, self.info.device)
        self.stop_request = StopRequest(self.info.world_size, backend=backend)  # collective: every rank builds it
        # Steps only (armed after step 1); collectives fail on their own after parallel.timeout_s.
        self.watchdog = Watchdog(2 * cfg.parallel.timeout_s, self.info.rank, self.info.world_size)
        # Heartbeats in the launcher's store, so a survivor can name the rank that died or hangs.
        self.peers = peers.PeerHeartbeat.from_env(self.info.rank, self.info.world_size, cfg.parallel.timeout_s)
        peers.set_current(self.peers)

    def _stop_requested(self, is_last: bool) -> int:
        """Step boundary: heartbeat, then the stop signal every rank agrees on (0 = go on).

        After the last step the watchdog is disarmed (final evaluation and save are not steps) and
        a late signal is ignored: the run is finishing anyway.
        """
        if is_last:
            self.watchdog.disarm()
            return 0
        self.watchdog.beat(self.step)
        if self.peers is not None:
            self.peers.step = self.step  # published by the heartbeat thread
        # Multi-rank it is an all-reduce where fast ranks wait for stragglers: part of the breakdown.
        with self._collectives_phase():
            return self.stop_request.agreed()

    def _collectives_phase(self) -> contextlib.AbstractContextManager[Any]:
        """Time spent in the step's collectives (multi-rank only; a single process has none)."""
        return self.timer.phase("collectives_s") if self.info.world_size > 1 else contextlib.nullcontext()

    def _stop_on_signal(self, signum: int, last_train: dict[str, Any]) -> dict[str, Any]:
        """Preemption: commit a checkpoint of this step, mark the run preempted, return to the CLI (exit 75/130)."""
        name = StopRequest.name(signum)
        if received := self.stop_request.describe():  # only the ranks the signal reached say so
            label = messages.rank_label()
            messages.say(f"bigtrain: {label + ': ' if label else ''}{received}; stopping after step {self.step} "
                         f"and saving a checkpoint", every_rank=True)
        every = self.cfg.checkpoint.every_steps
        if not (every and self.step % every == 0) and self._saved_step != self.step:  # not saved at this step yet
            self.save_checkpoint(blocking=True)
        self._wait_for_checkpoint()  # an async save must be committed before the process exits
        if self.info.is_main:
            write_status(self.run_dir, "preempted", signal=name, step=self.step, tokens=self.tokens_seen)
        messages.say(f"stopped by {name} after step {self.step}: checkpoint committed; exiting with status "
                     f"{StopRequest.exit_status(signum)} (resume with checkpoint.resume=auto)")
        for logger in self.loggers:
            logger.close()
        self.strategy.barrier()
        return {"step": self.step, "tokens": self.tokens_seen, "loss": last_train.get("loss"), "stopped_by": signum}

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over the global batch: (mean loss, grad norm, lr) — tensors stay on device."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        timer = self.timer  # phases are timed without a host sync (CUDA events); see train/timing.py
        with timer.phase("data_wait_s"):
            micro_batches = self.loader.next_step()
        with timer.phase("fwd_bwd_s"):
            device = self.info.device
            batches = [MicroBatch(b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True),
                                  self._doc_kwargs(b)) for b in micro_batches]
            rank_loss = self.strategy.forward_backward(self.model, batches)
        with self._collectives_phase():
            mean_loss = self.strategy.reduce_mean(rank_loss)  # the same on every rank
        with timer.phase("optimizer_s"):
            grad_norm = self.strategy.clip_grad_norm(self.model, self.cfg.train.grad_clip)
            # Non-finite first (a NaN step never reaches the spike window), then loss spikes.
            applied = (self.nonfinite.allows_update(self.step + 1, mean_loss, grad_norm)
                       and self.spikes.allows_update(self.step + 1, mean_loss, grad_norm, self.optimizer))
            if applied:
                self.strategy.step(self.optimizer)
            else:
                self.optimizer.zero_grad(set_to_none=True)  # drop the update; data and schedule move on
            if self.moe_stats is not None:  # the router biases move with the weights (or not at all)
                update_router_biases(self.moe_stats, self.moe_layers, self._moe_reduce, apply=applied)
        self.step += 1
        self.tokens_seen += self.cfg.train.global_batch_tokens
        timer.step_done()
        return mean_loss, grad_norm, lr

    def _moe_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Routing statistics averaged over all ranks: every rank then nudges its router biases alike.

        All ranks, not only the data-parallel ones: context- and tensor-parallel peers already hold the
        statistics of their whole micro-batch (summed over the sequence shards in the forward), so they
        add equal copies, which leaves the mean, and the sign of each bias nudge, unchanged. (Pipeline
        parallelism, whose stages hold different layers, is refused for MoE models.)"""
        return self.strategy.reduce_mean(value)

    def _doc_kwargs(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-document masking inputs (data.document_ids: true) moved to the device; empty otherwise."""
        if batch.doc_ids is None:
            return {}
        return {"doc_ids": batch.doc_ids.to(self.info.device, non_blocking=True),
                "positions": batch.position_ids.to(self.info.device, non_blocking=True)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None, *, stoppable: bool = False) -> dict[str, float] | None:
        """Mean loss and bits-per-byte on the validation split (``max_batches`` defaults to eval.max_batches).

        ``stoppable``: before each batch every rank agrees on the stop signals (one tiny all-reduce; every rank
        runs the same number of batches), and a stop abandons the evaluation (None): the final evaluation runs
        after the final checkpoint, and a scheduler's grace period must not run out inside it.
        """
        if self.val_stream is None:
            return None
        t0 = time.perf_counter()
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.info.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for batch in eval_batches(self.val_stream, seq_len=self.cfg.data.seq_len,
                                  micro_batch_size=self.cfg.train.micro_batch_size,
                                  max_batches=self.cfg.eval.max_batches if max_batches is None else max_batches,
                                  rank=self.data_rank, world_size=self.data_world):
            if stoppable and self.stop_request.agreed():
                messages.say(f"bigtrain: final evaluation abandoned at step {self.step}: a stop signal arrived")
                return None
            inputs = batch.inputs.to(self.info.device)
            targets = batch.targets.to(self.info.device)
            with self.strategy.autocast():
                logits = self.model(inputs)
            losses = F.cross_entropy(logits.to(acc_dtype(logits)).flatten(0, 1), targets.flatten(), reduction="none")
            loss_sum += losses.sum().double()
            tokens += targets.numel()
            nbytes += self.byte_lengths[targets].sum().double()
        # Sums (not means) are reduced so every rank's tokens weigh the same.
        loss_sum, tokens, nbytes = (self.strategy.reduce_mean(x) for x in (loss_sum, tokens, nbytes))
        if tokens.item() == 0:
            raise UserError("the validation split is shorter than one batch (micro_batch_size x seq_len tokens); "
                            "add validation data, lower train.micro_batch_size, or set data.val_path: ''.")
        result = {
            "val_loss": loss_sum.item() / tokens.item(),
            "val_bpb": bits_per_byte(loss_sum.item(), int(nbytes.item())),
            "eval_s": time.perf_counter() - t0,
        }
        self._emit({"kind": "eval", "step": self.step, "tokens": self.tokens_seen, **result})
        return result

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; RUN_DIR/status.json says running, then finished or failed."""
        if self.status is not None:
            self.status.start(self.step, self.tokens_seen)
        if self.console is not None:
            self.console.start(self.step)  # the ETA clock
        try:
            # SIGUSR1/SIGTERM/SIGINT handlers; no-progress watchdog; heartbeats for the peers
            with self.stop_request, self.watchdog, self.peers or contextlib.nullcontext():
                summary = self._fit()
        except BaseException as exc:  # also KeyboardInterrupt/SystemExit: the run did not finish
            if self.status is not None:
                self.status.finish("failed", step=self.step, tokens=self.tokens_seen,
                                   error=f"{type(exc).__name__}: {exc}"[:1000])
            raise
        finally:
            self.run_lock.release()
            self._restore_message_sink()
        if self.status is not None:
            self.status.finish("finished", step=self.step, tokens=self.tokens_seen)
        return summary

    def _fit(self) -> dict[str, Any]:
        """The loop: periodic logging, evaluation and checkpoints."""
        cfg = self.cfg
        self._print_header()
        last_eval: dict[str, float] | None = None
        last_train: dict[str, Any] = {}
        t_window, steps_window = time.perf_counter(), 0
        t_start = time.perf_counter()
        while self.step < cfg.train.max_steps:
            if self.profiler is not None:  # starting/writing a profile is not step time
                t_window += self.profiler.before_step(self.step + 1)
            loss, grad_norm, lr = self.train_step()
            if self.profiler is not None:
                t_window += self.profiler.after_step(self.step)
            if self.console is not None:
                self.console.progress(self.step)
            steps_window += 1
            is_last = self.step == cfg.train.max_steps
            if self.step % cfg.log.every_steps == 0 or self.step == 1 or is_last:
                loss_value = loss.item()  # the only host sync of a step, and only on log steps
                self.nonfinite.check(f"at log step {self.step}")
                last_train = self._train_record(loss_value, grad_norm, lr, time.perf_counter() - t_window,
                                                steps_window)
                self._emit(last_train)
                t_window, steps_window = time.perf_counter(), 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not is_last:
                t_eval = time.perf_counter()
                last_eval = self.evaluate()
                t_window += time.perf_counter() - t_eval  # evaluation time is not training throughput
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not is_last:
                self.save_checkpoint()
                # The loop was blocked this long: it counts in step time and shows as checkpoint_stall_s.
                self.timer.add("checkpoint_stall_s", self.last_checkpoint_stall_s)
            if signum := self._stop_requested(is_last):
                return self._stop_on_signal(signum, last_train)
        train_time = time.perf_counter() - t_start
        if self.profiler is not None:
            self.profiler.stop()  # training ended inside the window
        if cfg.checkpoint.at_end:
            # Before the final evaluation, and committed before it starts: a stop signal with a short grace
            # period (SIGTERM, SIGKILL seconds later) or a double Ctrl-C during the evaluation loses nothing.
            self.save_checkpoint(blocking=True)
            self._saved_step = self.step
        if cfg.eval.at_end:
            last_eval = self.evaluate(cfg.eval.final_max_batches, stoppable=True) or last_eval
        if signum := self.stop_request.agreed():  # arrived after the last step: honoured now, not after the sample
            return self._stop_on_signal(signum, last_train)
        if cfg.log.sample_at_end and cfg.log.sample_tokens:
            self._print_sample()
        self._wait_for_checkpoint()  # the last async save is committed before loggers close and the process exits
        for logger in self.loggers:
            logger.close()
        self.strategy.barrier()
        return {"step": self.step, "tokens": self.tokens_seen, "train_time_s": train_time,
                "loss": last_train.get("loss"), **(last_eval or {})}

    # ------------------------------------------------------------------ output
    def _train_record(self, loss: float, grad_norm: torch.Tensor, lr: float, elapsed_s: float,
                      num_steps: int) -> dict[str, Any]:
        """The ``kind: train`` metrics record of a log step, over the ``num_steps`` steps since the last one."""
        tokens_per_s = num_steps * self.cfg.train.global_batch_tokens / elapsed_s
        per_device = tokens_per_s / self.info.world_size
        return {
            "kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": loss,
            "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
            "mfu": mfu(per_device, self.flops_per_token, self.peak_flops),
            "step_time_s": elapsed_s / num_steps, "memory_gib": memory_gib(self.info.device),
            **self.spikes.record(self.step),
            **(moe_metrics(self.moe_stats, self.moe_layers, self._moe_reduce) if self.moe_stats is not None else {}),
            "epoch": self.loader.epoch, **self.loader.log_stats(), **self.timer.summary(),
            **memory_stats(self.info.device),
        }

    def _emit(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def _print_header(self) -> None:
        if not self.info.is_main:
            return
        from bigtrain.kernels.report import describe_kernels

        c = self.cfg
        kernels = describe_kernels(c.model.kernels, fp8=c.model.fp8, head_dim=c.model.head_dim, device=self.info.device,
                                   compute_dtype=self.strategy.compute_dtype)
        described = self.strategy.describe()  # the backend's name, N-D layout and compiled blocks
        if described.kernels:
            kernels += f"; {described.kernels}"
        messages.say(
            f"bigtrain: run {c.run.name!r} -> {self.run_dir}\n"
            f"  model    {self.num_params / 1e6:.2f}M params ({c.model.num_layers} layers, dim {c.model.dim}, "
            f"{c.model.num_heads} heads / {c.model.kv_heads} kv), {self.flops_per_token / 1e6:.1f} MFLOP/token\n"
            + (f"  moe      {c.model.moe.num_experts} experts, top {c.model.moe.top_k}, "
               f"{self.num_active_params / 1e6:.2f}M active params/token (MFLOP/token and MFU count the active "
               f"ones), balance {c.model.moe.load_balance}\n" if c.model.moe is not None else "") +
            f"  device   {self.info.device} x {self.info.world_size}, strategy {described.strategy}, "
            f"compute {str(self.strategy.compute_dtype).replace('torch.', '')}, threads {torch.get_num_threads()}"
            f"{'' if self.peak_flops else ', MFU n/a (no known peak for this device)'}\n"
            f"  kernels  {kernels}\n"
            f"  batch    {c.train.global_batch_tokens:,} tokens/step = {self.global_batch_seqs} x {c.data.seq_len} "
            f"(micro {c.train.micro_batch_size}, grad accum {self.accum_steps})\n"
            f"  data     {self.loader.summary()} train"
            f"{f', {self.val_stream.num_tokens:,} val tokens' if self.val_stream else ''}, "
            f"{c.train.max_steps} steps"
            + (f" = {c.train.max_steps * c.train.global_batch_tokens / n:.2f} epochs"
               if (n := self.loader.shard_tokens()) else "")
        )
        for warning in c.train.warnings():
            messages.warn(warning)

    def _print_sample(self) -> None:
        """Every rank generates (sharded models need every rank in each forward); rank 0 prints."""
        from bigtrain.model import Decoder
        from bigtrain.model.sampling import generate

        model = self.strategy.unwrap(self.model)
        assert isinstance(model, Decoder)  # wrappers (FSDP2's class swap included) keep the Decoder type
        text = generate(model, self.tokenizer, self.cfg.log.sample_prompt,
                        max_new_tokens=self.cfg.log.sample_tokens, temperature=0.8, top_k=50,
                        device=self.info.device, seed=self.cfg.run.seed)
        messages.say("sample:\n" + self.cfg.log.sample_prompt + text)

