"""RunConfig: the composition of every component's section, loaded strictly from YAML + overrides.

It lives in ``train/`` because the trainer is what consumes the whole of it; every other layer
receives only its own section. Tools import it as ``bigtrain.config`` (which re-exports it).

    cfg = load_config("configs/debug.yaml", ["train.lr=1e-3", "model.num_layers=4"])

Sections are owned by their components (``model``, ``data``, ``train``/``eval``/``log``,
``parallel``, ``checkpoint``); this module only composes them and checks the values that
span sections (e.g. batch tokens vs. sequence length).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bigtrain.checkpoint.config import CheckpointConfig
from bigtrain.data.config import DataConfig
from bigtrain.model.config import ModelConfig
from bigtrain.parallel.config import ParallelConfig
from bigtrain.sections import (
    ConfigError,
    Section,
    apply_overrides,
    config_hash,
    doc_field,
    dump_yaml,
    load_yaml,
    parse_section,
    to_dict,
)
from bigtrain.train.config import EvalConfig, LogConfig, TrainConfig

__all__ = ["ConfigError", "RunConfig", "RunSection", "load_config"]


@dataclass(frozen=True)
class RunSection(Section):
    """Identity and placement of a run."""

    name: str = doc_field("run", "Human-readable run name (used by loggers).")
    out_dir: str = doc_field("runs/run", "The run folder: config.yaml, metrics.jsonl and checkpoints/ are written "
                                         "here.")
    seed: int = doc_field(0, "Seed for weights, data order and sampling.")
    device: Literal["auto", "cpu", "cuda"] = doc_field("auto", "auto = CUDA if available, else CPU.")
    num_threads: int = doc_field(0, "CPU threads for torch (0 = torch's default).")

    def validate(self, path: str) -> None:
        if not self.out_dir:
            raise ConfigError(f"{path}.out_dir: must name the run folder.")
        if self.num_threads < 0:
            raise ConfigError(f"{path}.num_threads: must be >= 0.")


@dataclass(frozen=True)
class RunConfig(Section):
    """A whole training run."""

    run: RunSection = doc_field(RunSection(), "Run identity, output folder, seed and device.")
    model: ModelConfig = doc_field(ModelConfig(), "Model shape.")
    data: DataConfig = doc_field(DataConfig(), "Training and validation data.")
    train: TrainConfig = doc_field(TrainConfig(), "Optimization.")
    eval: EvalConfig = doc_field(EvalConfig(), "Validation.")
    parallel: ParallelConfig = doc_field(ParallelConfig(), "Distribution across processes.")
    checkpoint: CheckpointConfig = doc_field(CheckpointConfig(), "Checkpointing and resume.")
    log: LogConfig = doc_field(LogConfig(), "Logging.")

    def validate(self, path: str) -> None:
        seq, micro = self.data.seq_len, self.train.micro_batch_size
        if seq > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {seq} exceeds model.max_seq_len={self.model.max_seq_len}; "
                f"lower data.seq_len or raise model.max_seq_len."
            )
        if self.train.global_batch_tokens % seq:
            lo = max(seq, self.train.global_batch_tokens // seq * seq)
            raise ConfigError(
                f"train.global_batch_tokens: {self.train.global_batch_tokens} is not divisible by "
                f"data.seq_len={seq}; use a multiple such as {lo} or {lo + seq}."
            )
        seqs = self.train.global_batch_tokens // seq
        if seqs % micro:
            raise ConfigError(
                f"train.global_batch_tokens: {self.train.global_batch_tokens} tokens = {seqs} sequences of "
                f"{seq}, not divisible by train.micro_batch_size={micro}; make the global batch a multiple of "
                f"micro_batch_size * seq_len = {micro * seq} tokens."
            )
        if self.train.precision == "fp16" and self.parallel.strategy != "zero":
            # fp16 gradients underflow without loss scaling, and only DeepSpeed's engine scales the loss
            # (dynamic, skipping overflow steps); training fp16 unscaled would silently learn less.
            raise ConfigError(
                f"train.precision: fp16 needs dynamic loss scaling, which bigtrain provides only with "
                f"parallel.strategy=zero (DeepSpeed's loss scaler); with parallel.strategy={self.parallel.strategy} "
                f"use train.precision=bf16 (same speed on GPUs that have it, no loss scaling needed) or fp32."
            )
        if self.train.precision == "fp64":
            self._check_fp64()
        self.check_moe()  # first: what MoE cannot do yet is the message, not a follow-on requirement
        self.parallel.check_model(self.model, seq)
        self.parallel.check_pipeline(self.model)
        self._check_optimizer()
        if (self.train.compile and self.parallel.pipeline_parallel > 1
                and self.parallel.pipeline_schedule == "interleaved_zb"):
            # Measured: torch's compiled backward refuses the input pass's retain_graph (donated buffers);
            # without donation it would run each block's whole backward twice, undoing what the schedule buys.
            raise ConfigError("train.compile: a compiled block's backward cannot be split into the input- and "
                              "weight-gradient passes that parallel.pipeline_schedule=interleaved_zb runs apart; "
                              "use parallel.pipeline_schedule=interleaved_1f1b with train.compile=true, or "
                              "interleaved_zb with train.compile=false.")
        if self.train.on_nonfinite == "skip" and self.parallel.strategy == "zero":
            raise ConfigError("train.on_nonfinite: skip does not work with parallel.strategy=zero (DeepSpeed "
                              "computes the gradient norm inside its optimizer step, too late to skip it); use "
                              "train.on_nonfinite=stop.")
        if self.train.on_spike == "skip" and self.parallel.strategy == "zero":
            raise ConfigError("train.on_spike: skip does not work with parallel.strategy=zero (DeepSpeed computes the "
                              "gradient norm inside its optimizer step, too late to skip it); use train.on_spike=off, "
                              "or parallel.strategy=fsdp (sharded like ZeRO-3).")

    def _check_fp64(self) -> None:
        """train.precision=fp64 is the reference-numerics mode: every piece must compute in float64."""
        clashes = []
        if self.parallel.strategy == "zero":
            clashes.append("parallel.strategy=zero (DeepSpeed keeps fp32 master weights)")
        if self.model.kernels == "triton":
            clashes.append("model.kernels=triton (the fused kernels compute in fp32)")
        if self.model.fp8:
            clashes.append("model.fp8=true")
        if clashes:
            raise ConfigError(f"train.precision: fp64 computes everything in float64, which {' or '.join(clashes)} "
                              f"cannot; use train.precision=fp32 with it, or parallel.strategy=fsdp / single / ddp "
                              f"and model.kernels=torch, model.fp8=false with fp64.")

    def _check_optimizer(self) -> None:
        """train.optimizer=muon runs under single, ddp and fsdp (docs/optimizers.md)."""
        if self.train.optimizer != "muon":
            return
        if self.parallel.strategy == "zero":
            # DeepSpeed 0.19.8 has a Muon of its own, but only as its JSON-configured optimizer (not a client
            # optimizer like bigtrain's) and with a different update scale, so a run would not be this Muon.
            raise ConfigError("train.optimizer: muon does not run with parallel.strategy=zero (DeepSpeed would need "
                              "its own, differently scaled Muon); use parallel.strategy=fsdp (sharded like ZeRO-3) "
                              "or ddp, or train.optimizer=adamw with zero.")
        if self.parallel.strategy == "fsdp" and self.parallel.fsdp.cpu_offload:
            raise ConfigError("train.optimizer: muon gathers each hidden matrix on the device to orthogonalize it, "
                              "which parallel.fsdp.cpu_offload=true (host-resident shards) does not allow; set "
                              "parallel.fsdp.cpu_offload=false, or use train.optimizer=adamw.")

    def check_moe(self) -> None:
        """MoE runs under single, ddp and fsdp (with data, context, tensor and expert parallelism; docs/moe.md)."""
        if self.model.moe is None:
            return
        p = self.parallel
        if p.strategy == "zero":
            raise ConfigError("model.moe: parallel.strategy=zero does not train MoE models in bigtrain (DeepSpeed's "
                              "MoE layer has its own routing and parameter groups, not bigtrain's); use "
                              "parallel.strategy=fsdp (sharded like ZeRO-3, with parallel.expert_parallel).")
        if p.strategy == "fsdp" and p.pipeline_parallel > 1:
            raise ConfigError(f"model.moe: parallel.pipeline_parallel={p.pipeline_parallel} is not supported for MoE "
                              f"models yet (the routing losses of earlier stages would not reach the last); use "
                              f"parallel.expert_parallel with parallel.pipeline_parallel=1.")

    def check_launch(self, world_size: int) -> tuple[int, int]:
        """Everything that depends on the number of processes (``bigtrain config check --world-size``, the
        launch scripts and the trainer all call this): the parallel layout and the batch split. Returns
        :meth:`batch_layout`."""
        self.parallel.check_world_size(world_size)
        seqs, accum = self.batch_layout(self.parallel.data_parallel_size(world_size))
        self.parallel.check_microbatches(accum * self.train.micro_batch_size, accum)
        return seqs, accum

    def batch_layout(self, data_parallel_size: int) -> tuple[int, int]:
        """(sequences per step across ranks, gradient-accumulation steps) for ``data_parallel_size`` ranks that
        read different batches (all ranks, unless tensor/context parallelism groups them)."""
        seqs = self.train.global_batch_tokens // self.data.seq_len
        per_pass = self.train.micro_batch_size * data_parallel_size
        if seqs % per_pass:
            ranks = "ranks" if not self.parallel.model_parallel_degrees else "data-parallel ranks"
            raise ConfigError(
                f"train.global_batch_tokens: {seqs} sequences per step cannot be split over {data_parallel_size} "
                f"{ranks} x micro_batch_size {self.train.micro_batch_size}; make it a multiple of "
                f"{per_pass * self.data.seq_len} tokens."
            )
        return seqs, seqs // per_pass

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = to_dict(self)
        return plain

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def hash(self) -> str:
        return config_hash(self.to_dict())


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return parse_section(RunConfig, data, "")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its plain-data form (e.g. a run folder's config.yaml)."""
    return parse_section(RunConfig, data, "")
