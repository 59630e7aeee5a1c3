"""The ``train``, ``eval`` and ``log`` config sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.sections import ConfigError, Section, doc_field


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimization: batch, steps, AdamW, LR schedule, clipping and precision."""

    max_steps: int = doc_field(1000, "Optimizer steps to train for.")
    global_batch_tokens: int = doc_field(65536, "Tokens per optimizer step across all ranks; fixed whatever the world size (gradient accumulation absorbs the rest).")
    micro_batch_size: int = doc_field(8, "Sequences per forward/backward on one rank.")
    lr: float = doc_field(3e-4, "Peak learning rate.")
    lr_schedule: Literal["cosine", "wsd", "constant"] = doc_field("cosine", "Schedule after warmup: cosine decay, warmup-stable-decay, or constant.")
    lr_warmup_steps: int = doc_field(100, "Linear warmup steps.")
    min_lr_ratio: float = doc_field(0.1, "Final learning rate as a fraction of lr (cosine and wsd).")
    lr_decay_fraction: float = doc_field(0.2, "wsd only: fraction of max_steps spent in the final linear decay.")
    weight_decay: float = doc_field(0.1, "AdamW decoupled weight decay on matrices (not on norm gains).")
    beta1: float = doc_field(0.9, "AdamW beta1.")
    beta2: float = doc_field(0.95, "AdamW beta2.")
    adam_eps: float = doc_field(1e-8, "AdamW epsilon.")
    grad_clip: float = doc_field(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc_field("auto", "auto = bf16 autocast on GPUs that support it, fp32 on CPU.")
    compile: bool = doc_field(False, "torch.compile each Transformer block (applied before sharding).")

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


@dataclass(frozen=True)
class EvalConfig(Section):
    """Periodic validation on the held-out split."""

    every_steps: int = doc_field(200, "Evaluate every N optimizer steps (0 = only at the end).")
    max_batches: int = doc_field(20, "Micro-batches per evaluation (0 = the whole validation split).")
    at_end: bool = doc_field(True, "Also evaluate after the last step.")
    final_max_batches: int = doc_field(0, "Micro-batches for the evaluation after the last step (0 = the whole validation split).")

    def validate(self, path: str) -> None:
        if self.every_steps < 0 or self.max_batches < 0 or self.final_max_batches < 0:
            raise ConfigError(f"{path}: every_steps, max_batches and final_max_batches must be >= 0.")


@dataclass(frozen=True)
class LogConfig(Section):
    """Console and metrics.jsonl logging."""

    every_steps: int = doc_field(10, "Log a line every N optimizer steps (the first and last step are always logged).")
    console: bool = doc_field(True, "Print log lines to stdout (metrics.jsonl is always written).")
    sample_at_end: bool = doc_field(True, "Print a short generated sample after training.")
    sample_prompt: str = doc_field("", "Prompt for the end-of-training sample (empty = start of a document).")
    sample_tokens: int = doc_field(100, "Tokens to generate for the end-of-training sample.")

    def validate(self, path: str) -> None:
        if self.every_steps <= 0:
            raise ConfigError(f"{path}.every_steps: must be positive, got {self.every_steps}.")
        if self.sample_tokens < 0:
            raise ConfigError(f"{path}.sample_tokens: must be >= 0.")
