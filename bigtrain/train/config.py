"""The ``train``, ``eval`` and ``log`` config sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.sections import ConfigError, Section, doc_field


@dataclass(frozen=True)
class MuonConfig(Section):
    """Muon options (train.optimizer=muon; see docs/optimizers.md)."""

    momentum: float = doc_field(0.95, "Momentum of the Muon matrices.", ge=0, lt=1)
    nesterov: bool = doc_field(True, "Nesterov momentum (orthogonalize grad + momentum * buffer).")
    ns_steps: int = doc_field(5, "Newton-Schulz iterations of the orthogonalization.", ge=1, le=20)
    adamw_lr: float = doc_field(0.0, "Peak learning rate of the AdamW group (embeddings, output projection, norms); "
                                     "0 = train.lr. It follows train.lr's schedule, scaled by adamw_lr / train.lr.",
                                ge=0)


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimization: batch, steps, AdamW, LR schedule, clipping and precision."""

    max_steps: int = doc_field(1000, "Optimizer steps to train for.")
    global_batch_tokens: int = doc_field(65536, "Tokens per optimizer step across all ranks; fixed whatever the world "
                                                "size (gradient accumulation absorbs the rest).")
    micro_batch_size: int = doc_field(8, "Sequences per forward/backward on one rank.")
    lr: float = doc_field(3e-4, "Peak learning rate.")
    lr_schedule: Literal["cosine", "wsd", "constant"] = doc_field("cosine", "Schedule after warmup: cosine decay, "
                                                                            "warmup-stable-decay, or constant.")
    lr_warmup_steps: int = doc_field(100, "Linear warmup steps.")
    min_lr_ratio: float = doc_field(0.1, "Final learning rate as a fraction of lr (cosine and wsd).")
    lr_decay_fraction: float = doc_field(0.2, "wsd only: fraction of max_steps spent in the final linear decay.")
    weight_decay: float = doc_field(0.1, "AdamW decoupled weight decay on matrices (not on norm gains).")
    beta1: float = doc_field(0.9, "AdamW beta1.")
    beta2: float = doc_field(0.95, "AdamW beta2.")
    adam_eps: float = doc_field(1e-8, "AdamW epsilon.", gt=0)
    optimizer: Literal["adamw", "muon"] = doc_field("adamw", "adamw, or muon: Muon (orthogonalized momentum) for the "
                                                             "Transformer blocks' matrices and AdamW (beta1, beta2, "
                                                             "adam_eps) for embeddings, output projection and norms. "
                                                             "Not with parallel.strategy=zero. See docs/optimizers.md.")
    muon: MuonConfig = doc_field(MuonConfig(), "Muon options (train.optimizer=muon).")
    grad_clip: float = doc_field(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp64"] = doc_field(
        "auto", "auto = bf16 autocast on GPUs that support it, fp32 on CPU. fp16 only with parallel.strategy=zero "
                "(DeepSpeed's dynamic loss scaling). fp64: parameters, gradients, optimizer state and compute in "
                "float64, for numerics tests and debugging (rounding differences between CPUs shrink to ~1e-16; "
                "about 2x slower than fp32 on CPUs, far slower on GPUs); not with parallel.strategy=zero, "
                "model.kernels=triton or model.fp8.")
    compile: bool = doc_field(False, "torch.compile each Transformer block (applied before sharding).")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = doc_field(
        "inductor", "torch.compile backend for train.compile: inductor (fused generated kernels), or aot_eager / "
                    "eager to bisect a compile problem (tracing without code generation).")
    on_nonfinite: Literal["stop", "skip"] = doc_field("stop", "NaN/Inf loss or grad norm: stop = exit with status 3 "
                                                              "without saving a checkpoint (checked on log steps and "
                                                              "before every save; no per-step host sync); skip = drop "
                                                              "that step's update (costs one host sync per step). See "
                                                              "docs/multinode.md.")
    max_consecutive_skips: int = doc_field(5, "on_nonfinite=skip: stop (status 3) after this many non-finite steps in "
                                              "a row.")
    on_spike: Literal["off", "skip"] = doc_field("off", "Loss spikes: skip = drop the update of a step whose loss or "
                                                        "grad norm exceeds its mean over the last spike_window "
                                                        "accepted steps by more than spike_sigma standard deviations "
                                                        "(data and LR schedule move on; no host sync with fused AdamW "
                                                        "on CUDA, one per step otherwise). See docs/multinode.md.")
    spike_window: int = doc_field(50, "on_spike=skip: accepted steps in the rolling window (also the warm-up: no step "
                                      "is judged before the window is full).")
    spike_sigma: float = doc_field(6.0, "on_spike=skip: a step is a spike when its loss or grad norm is more than this "
                                        "many standard deviations above the window's mean.")
    debug_poison_steps: list[int] = doc_field([], "Testing aid only: multiply the loss by NaN at these optimizer steps "
                                                  "(1-based) to exercise on_nonfinite.")
    debug_spike_steps: list[int] = doc_field([], "Testing aid only: multiply the loss by 1000 at these optimizer steps "
                                                 "(1-based) to exercise on_spike.")

    def warnings(self, path: str = "train") -> list[str]:
        """Valid but probably unintended settings, said once at the start of a run."""
        out = []
        if self.lr_warmup_steps > self.max_steps:
            reached = self.lr * self.max_steps / self.lr_warmup_steps
            out.append(f"warning: {path}.lr_warmup_steps={self.lr_warmup_steps} is more than {path}.max_steps="
                       f"{self.max_steps}: the learning rate never reaches {path}.lr={self.lr:g} (it ends near "
                       f"{reached:.3g}); lower lr_warmup_steps or raise max_steps.")
        return out

    def validate(self, path: str) -> None:
        for name in ("max_steps", "global_batch_tokens", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be positive, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be positive, got {self.lr}.")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"{path}.lr_warmup_steps: must be >= 0, got {self.lr_warmup_steps}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio: must be within [0, 1], got {self.min_lr_ratio}.")
        if not 0 < self.lr_decay_fraction <= 1:
            raise ConfigError(f"{path}.lr_decay_fraction: must be within (0, 1], got {self.lr_decay_fraction}.")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{path}: weight_decay and grad_clip must be >= 0.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"{path}: beta1 and beta2 must be within [0, 1).")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"{path}.max_consecutive_skips: must be >= 1, got {self.max_consecutive_skips}.")
        if any(step < 1 for step in self.debug_poison_steps):
            raise ConfigError(f"{path}.debug_poison_steps: steps are 1-based, got {self.debug_poison_steps}.")
        if any(step < 1 for step in self.debug_spike_steps):
            raise ConfigError(f"{path}.debug_spike_steps: steps are 1-based, got {self.debug_spike_steps}.")
        if self.spike_window < 2:
            raise ConfigError(f"{path}.spike_window: must be >= 2 (a standard deviation needs two steps), got "
                              f"{self.spike_window}; e.g. {path}.spike_window=50.")
        if not self.spike_sigma > 0:
            raise ConfigError(f"{path}.spike_sigma: must be > 0 (standard deviations above the mean), got "
                              f"{self.spike_sigma}; e.g. {path}.spike_sigma=6.")


@dataclass(frozen=True)
class EvalConfig(Section):
    """Periodic validation on the held-out split."""

    every_steps: int = doc_field(200, "Evaluate every N optimizer steps (0 = only at the end).")
    max_batches: int = doc_field(20, "Micro-batches per evaluation over all ranks, rounded up to a multiple of the "
                                     "world size (0 = the whole validation split).")
    at_end: bool = doc_field(True, "Also evaluate after the last step.")
    final_max_batches: int = doc_field(0, "Micro-batches for the evaluation after the last step (0 = the whole "
                                          "validation split).")

    def validate(self, path: str) -> None:
        if self.every_steps < 0 or self.max_batches < 0 or self.final_max_batches < 0:
            raise ConfigError(f"{path}: every_steps, max_batches and final_max_batches must be >= 0.")


@dataclass(frozen=True)
class WandbConfig(Section):
    """Weights & Biases logging (rank 0 only; the resolved config is uploaded)."""

    mode: Literal["disabled", "offline", "online"] = doc_field("disabled", "disabled, offline (files under "
                                                                           "RUN_DIR/wandb, sync later with `wandb "
                                                                           "sync`) or online (needs WANDB_API_KEY or "
                                                                           "`wandb login`). The WANDB_MODE environment "
                                                                           "variable, when set, overrides this.")
    project: str = doc_field("bigtrain", "W&B project.")
    entity: str = doc_field("", "W&B entity (team or user); empty = your default entity.")
    name: str = doc_field("", "W&B run name; empty = run.name.")
    tags: list[str] = doc_field([], "W&B run tags.")

    def validate(self, path: str) -> None:
        if not self.project:
            raise ConfigError(f"{path}.project: must name a W&B project (e.g. {path}.project=bigtrain).")


@dataclass(frozen=True)
class ProfileConfig(Section):
    """torch.profiler window (rank 0 only)."""

    steps: list[int] = doc_field([], "[first, last] optimizer steps (1-based, inclusive) to profile into "
                                     "RUN_DIR/profile/ (a Chrome trace, an op summary and, on CUDA, a memory "
                                     "snapshot); [] = off.")

    def validate(self, path: str) -> None:
        if not self.steps:
            return
        if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
            raise ConfigError(f"{path}.steps: expected [first, last] with 1 <= first <= last, got {self.steps}; "
                              f"e.g. {path}.steps=[10,12] (or [] for no profiling).")


@dataclass(frozen=True)
class LogConfig(Section):
    """Logging: console, metrics.jsonl (always), W&B, TensorBoard and the profiler window."""

    every_steps: int = doc_field(10, "Log a line every N optimizer steps (the first and last step are always logged).")
    console: bool = doc_field(True, "Print log lines to stdout, with a progress bar and ETA (metrics.jsonl is always "
                                    "written).")
    sample_at_end: bool = doc_field(True, "Print a short generated sample after training.")
    sample_prompt: str = doc_field("", "Prompt for the end-of-training sample (empty = start of a document).")
    sample_tokens: int = doc_field(100, "Tokens to generate for the end-of-training sample.")
    tensorboard: bool = doc_field(False, "Also write TensorBoard event files to RUN_DIR/tensorboard (rank 0).")
    wandb: WandbConfig = doc_field(WandbConfig(), "Weights & Biases logging.")
    profile: ProfileConfig = doc_field(ProfileConfig(), "Profiler window.")

    def validate(self, path: str) -> None:
        if self.every_steps <= 0:
            raise ConfigError(f"{path}.every_steps: must be positive, got {self.every_steps}.")
        if self.sample_tokens < 0:
            raise ConfigError(f"{path}.sample_tokens: must be >= 0.")
