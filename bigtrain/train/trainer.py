"""The training loop. ``Trainer.train_step`` is the whole step on one screen; the rest is set-up,
evaluation, checkpointing and logging hung around it.

The trainer talks to a :class:`~bigtrain.parallel.strategy.Strategy` only, so it has no
branches per backend.
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from bigtrain.checkpoint.manager import CheckpointManager, capture_rng, load_state, resolve_resume, restore_rng
from bigtrain.config import RunConfig
from bigtrain.data.loader import TokenStream, TrainLoader, eval_batches
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.model import build_on_meta, count_parameters, flops_per_token
from bigtrain.optim.optimizer import build_adamw
from bigtrain.optim.schedule import LRSchedule
from bigtrain.parallel import dist
from bigtrain.parallel.strategy import build_strategy
from bigtrain.train.loggers import ConsoleLogger, JsonlLogger, Logger
from bigtrain.train.metrics import bits_per_byte, memory_gib, mfu, peak_flops

Print = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds every component of a run from its config and trains it."""

    def __init__(self, cfg: RunConfig, *, echo: Print = print) -> None:
        self.cfg, self.echo = cfg, echo
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        self.info = dist.init(cfg.run.device)
        seed_everything(cfg.run.seed)

        # --- Everything a user can get wrong is checked before the run folder is touched.
        self.tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"the tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size to at least {self.tokenizer.vocab_size} "
                f"(a multiple of 64 such as {64 * math.ceil(self.tokenizer.vocab_size / 64)} is fastest)."
            )
        fingerprint = self.tokenizer.fingerprint
        self.train_stream = TokenStream.open(cfg.data.train_path, vocab_size=cfg.model.vocab_size,
                                             tokenizer_fingerprint=fingerprint, what="training")
        self.val_stream = (TokenStream.open(cfg.data.val_path, vocab_size=cfg.model.vocab_size,
                                            tokenizer_fingerprint=fingerprint, what="validation")
                           if cfg.data.val_path else None)
        self.global_batch_seqs, self.accum_steps = cfg.batch_layout(self.info.world_size)
        self.loader = TrainLoader(
            self.train_stream, seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
            global_batch_seqs=self.global_batch_seqs, rank=self.info.rank, world_size=self.info.world_size,
            seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        )
        self.run_dir = Path(cfg.run.out_dir)
        self.resume_from = resolve_resume(cfg.checkpoint.resume, self.run_dir)
        self._prepare_run_dir()
        dist.init_process_group(self.info, dist.resolve_backend(cfg.parallel.backend, self.info.device),
                                cfg.parallel.timeout_s)

        # --- Model: built on meta, placed/sharded/initialized by the strategy.
        self.strategy = build_strategy(cfg.parallel, self.info, cfg.train.precision,
                                       train=cfg.train, accum_steps=self.accum_steps)
        t = cfg.train
        self.model, self.optimizer = self.strategy.wrap(
            build_on_meta(cfg.model),
            lambda m: build_adamw(m, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.adam_eps),
            seed=cfg.run.seed,
        )
        self.schedule = LRSchedule(t.lr_schedule, t.lr, t.lr_warmup_steps, t.max_steps, t.min_lr_ratio, t.lr_decay_fraction)
        self.byte_lengths = torch.from_numpy(self.tokenizer.token_byte_lengths()).to(self.info.device)
        self.num_params = count_parameters(cfg.model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.info.device)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=cfg.checkpoint.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.loggers: list[Logger] = []
        if self.info.is_main:
            self.loggers.append(JsonlLogger(self.run_dir / "metrics.jsonl"))
            if cfg.log.console:
                self.loggers.append(ConsoleLogger(cfg.train.max_steps, stream=None))
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # ------------------------------------------------------------------ set-up helpers
    def _prepare_run_dir(self) -> None:
        existed = self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            if not existed:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise UserError(
                f"cannot write to the run folder {str(self.run_dir)!r} ({exc.strerror or exc}); "
                f"set run.out_dir to a writable location."
            ) from None
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())

    def _resume(self, path: Path) -> None:
        state = load_state(path, map_location=self.info.device)
        saved_model = state.get("config", {}).get("model", {})
        current = self.cfg.to_dict()["model"]
        diff = sorted(k for k in set(saved_model) | set(current) if k != "preset" and saved_model.get(k) != current.get(k))
        if diff:
            details = ", ".join(f"model.{k}: {saved_model.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise UserError(f"cannot resume from {path}: the model architecture changed ({details}). "
                            f"Use the checkpoint's model settings or start a new run folder.")
        self.strategy.load_state_dict(self.model, self.optimizer, state)
        self.loader.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.step = int(state["trainer"]["step"])
        self.tokens_seen = int(state["trainer"]["tokens_seen"])
        self.echo(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.strategy.state_dict(self.model, self.optimizer),
            "data": self.loader.state_dict(),
            "rng": capture_rng(),
            "trainer": {"step": self.step, "tokens_seen": self.tokens_seen},
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Gather the state (collective) and write it from rank 0; every rank waits for the commit."""
        t0 = time.perf_counter()
        state = self.state_dict()
        path = self.checkpoints.root / f"step_{self.step:06d}"
        if self.info.is_main:
            path = self.checkpoints.save(self.step, state, config_hash=self.cfg.hash())
            self.echo(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        self.strategy.barrier()
        return path

    # ------------------------------------------------------------------ the step
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over the global batch: (mean loss, grad norm, lr) — tensors stay on device."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        micro_batches = self.loader.next_step()
        loss_sum = torch.zeros((), device=self.info.device)
        for i, batch in enumerate(micro_batches):
            inputs = batch.inputs.to(self.info.device, non_blocking=True)
            targets = batch.targets.to(self.info.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            with self.strategy.no_sync(self.model) if not last else contextlib.nullcontext():
                with self.strategy.autocast():
                    loss = self.model(inputs, targets)
                self.strategy.backward(loss / len(micro_batches))
            loss_sum += loss.detach()
        grad_norm = self.strategy.clip_grad_norm(self.model, self.cfg.train.grad_clip)
        self.strategy.step(self.optimizer)
        self.step += 1
        self.tokens_seen += self.cfg.train.global_batch_tokens
        return self.strategy.reduce_mean(loss_sum / len(micro_batches)), grad_norm, lr

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float] | None:
        """Mean loss and bits-per-byte on the validation split (``max_batches`` defaults to eval.max_batches)."""
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
                                  rank=self.info.rank, world_size=self.info.world_size):
            inputs = batch.inputs.to(self.info.device)
            targets = batch.targets.to(self.info.device)
            with self.strategy.autocast():
                logits = self.model(inputs)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
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
        """Train to ``train.max_steps`` with periodic logging, evaluation and checkpoints."""
        cfg = self.cfg
        self._print_header()
        last_eval: dict[str, float] | None = None
        last_train: dict[str, Any] = {}
        t_window, steps_window = time.perf_counter(), 0
        t_start = time.perf_counter()
        while self.step < cfg.train.max_steps:
            loss, grad_norm, lr = self.train_step()
            steps_window += 1
            is_last = self.step == cfg.train.max_steps
            if self.step % cfg.log.every_steps == 0 or self.step == 1 or is_last:
                loss_value = loss.item()  # the only host sync of a step, and only on log steps
                elapsed = time.perf_counter() - t_window
                tokens_per_s = steps_window * cfg.train.global_batch_tokens / elapsed
                per_device = tokens_per_s / self.info.world_size
                last_train = {
                    "kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": loss_value,
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
                    "mfu": mfu(per_device, self.flops_per_token, self.peak_flops),
                    "step_time_s": elapsed / steps_window, "memory_gib": memory_gib(self.info.device),
                    "epoch": self.loader.epoch,
                }
                self._emit(last_train)
                t_window, steps_window = time.perf_counter(), 0
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not is_last:
                last_eval = self.evaluate()
                t_window = time.perf_counter()  # evaluation time is not training throughput
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not is_last:
                self.save_checkpoint()
                t_window = time.perf_counter()
        train_time = time.perf_counter() - t_start
        if cfg.eval.at_end:
            last_eval = self.evaluate(cfg.eval.final_max_batches) or last_eval
        if cfg.checkpoint.at_end:
            self.save_checkpoint()
        if cfg.log.sample_at_end and cfg.log.sample_tokens:
            self._print_sample()
        for logger in self.loggers:
            logger.close()
        self.strategy.barrier()
        return {"step": self.step, "tokens": self.tokens_seen, "train_time_s": train_time,
                "loss": last_train.get("loss"), **(last_eval or {})}

    # ------------------------------------------------------------------ output
    def _emit(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def _print_header(self) -> None:
        if not self.info.is_main:
            return
        c = self.cfg
        self.echo(
            f"bigtrain: run {c.run.name!r} -> {self.run_dir}\n"
            f"  model    {self.num_params / 1e6:.2f}M params ({c.model.num_layers} layers, dim {c.model.dim}, "
            f"{c.model.num_heads} heads / {c.model.kv_heads} kv), {self.flops_per_token / 1e6:.1f} MFLOP/token\n"
            f"  device   {self.info.device} x {self.info.world_size}, strategy {c.parallel.strategy}, "
            f"compute {str(self.strategy.compute_dtype).replace('torch.', '')}, threads {torch.get_num_threads()}"
            f"{'' if self.peak_flops else ', MFU n/a (no known peak for this device)'}\n"
            f"  batch    {c.train.global_batch_tokens:,} tokens/step = {self.global_batch_seqs} x {c.data.seq_len} "
            f"(micro {c.train.micro_batch_size}, grad accum {self.accum_steps})\n"
            f"  data     {self.train_stream.num_tokens:,} train tokens"
            f"{f', {self.val_stream.num_tokens:,} val tokens' if self.val_stream else ''}, "
            f"{c.train.max_steps} steps = {c.train.max_steps * c.train.global_batch_tokens / max(1, self.train_stream.num_tokens):.2f} epochs"
        )

    def _print_sample(self) -> None:
        """Every rank generates (sharded models need every rank in each forward); rank 0 prints."""
        from bigtrain.generate import generate

        text = generate(self.strategy.unwrap(self.model), self.tokenizer, self.cfg.log.sample_prompt,
                        max_new_tokens=self.cfg.log.sample_tokens, temperature=0.8, top_k=50,
                        device=self.info.device, seed=self.cfg.run.seed)
        if self.info.is_main:
            self.echo("sample:\n" + self.cfg.log.sample_prompt + text)

