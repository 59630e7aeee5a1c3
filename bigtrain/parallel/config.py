"""The ``parallel`` config section (and its per-backend subsections)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from bigtrain.model.config import ModelConfig
from bigtrain.sections import ConfigError, Section, doc_field


@dataclass(frozen=True)
class FSDPConfig(Section):
    """PyTorch FSDP2 (``fully_shard``) options."""

    param_dtype: Literal["auto", "fp32", "bf16"] = doc_field("auto", "Dtype parameters are all-gathered and computed "
                                                                     "in (auto = follow train.precision).")
    reduce_dtype: Literal["fp32", "bf16"] = doc_field("fp32", "Dtype gradients are reduce-scattered in.")
    reshard_after_forward: bool = doc_field(True, "Free gathered parameters after forward (ZeRO-3 like); false keeps "
                                                  "them until backward (ZeRO-2 like, more memory, less communication).")
    cpu_offload: bool = doc_field(False, "Keep sharded parameters, gradients and optimizer state in host memory.")
    replicate_degree: int = doc_field(1, "HSDP: number of replica groups (shard within a group, replicate across "
                                         "groups, e.g. = number of nodes). 1 = plain FSDP over all ranks.")

    def validate(self, path: str) -> None:
        if self.replicate_degree < 1:
            raise ConfigError(f"{path}.replicate_degree: must be >= 1, got {self.replicate_degree}.")


@dataclass(frozen=True)
class ZeroConfig(Section):
    """DeepSpeed ZeRO options (the DeepSpeed JSON is generated from these and the train section)."""

    stage: int = doc_field(2, "ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters (0 = plain "
                              "data parallel).")
    offload_optimizer: bool = doc_field(False, "Keep optimizer state in host memory.")
    offload_params: bool = doc_field(False, "Stage 3 only: keep parameters in host memory.")
    extra: dict[str, Any] = doc_field({}, "Extra keys merged into the generated DeepSpeed config (advanced; overrides "
                                          "bigtrain's values).")

    def validate(self, path: str) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.stage: ZeRO stage must be 0, 1, 2 or 3, got {self.stage}.")
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"{path}.offload_params: parameter offload needs stage 3 (stage is {self.stage}).")


@dataclass(frozen=True)
class ParallelConfig(Section):
    """How the model is distributed across processes."""

    strategy: Literal["single", "ddp", "fsdp", "zero"] = doc_field("single", "Backend: single (one process), ddp, fsdp "
                                                                             "(FSDP2 fully_shard) or zero (DeepSpeed "
                                                                             "ZeRO).")
    backend: Literal["auto", "nccl", "gloo"] = doc_field("auto", "Collective backend: auto = nccl on CUDA, gloo on "
                                                                 "CPU.")
    timeout_s: int = doc_field(600, "Timeout of collective operations, in seconds; a hung rank makes the others fail "
                                    "after it.")
    activation_checkpointing: Literal["none", "full", "every_k"] = doc_field("none", "Recompute block activations in "
                                                                                     "backward: none, full (every "
                                                                                     "block) or every_k.")
    activation_checkpointing_every: int = doc_field(2, "every_k only: checkpoint every k-th block.")
    tensor_parallel: int = doc_field(1, "Tensor-parallel degree (strategy fsdp): attention heads, SwiGLU hidden and "
                                        "vocabulary split over this many ranks, with sequence parallelism between "
                                        "them. Keep it within one node (e.g. 8). 1 = off.", ge=1)
    context_parallel: int = doc_field(1, "Context-parallel degree (strategy fsdp): each sequence is split over this "
                                         "many ranks; attention exchanges heads for sequence by all-to-all "
                                         "(Ulysses). For long contexts. 1 = off.", ge=1)
    expert_parallel: int = doc_field(1, "Expert-parallel degree (strategy fsdp, MoE models): each MoE layer's routed "
                                        "experts are split over this many ranks, drawn from the data-, context- "
                                        "and tensor-parallel ranks, and tokens travel to their experts and "
                                        "back by all-to-all; expert weights are FSDP-sharded over the remaining "
                                        "ranks. Must divide model.moe.num_experts and dp_shard x cp x tp. "
                                        "1 = off (experts FSDP-sharded like every other weight). See "
                                        "docs/parallelism.md.", ge=1)
    pipeline_parallel: int = doc_field(1, "Pipeline-parallel degree (strategy fsdp): the blocks are cut into "
                                          "consecutive stages on this many ranks (across nodes, for the largest "
                                          "models). 1 = off.", ge=1)
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb"] = doc_field(
        "1f1b", "Pipeline schedule: gpipe, 1f1b, interleaved_1f1b or interleaved_zb (torch's interleaved "
                "zero-bubble schedule; the interleaved ones need pipeline_virtual_stages >= 2).")
    pipeline_microbatches: int = doc_field(0, "Microbatches the pipeline splits each rank's share of the step into "
                                              "(0 = one per train.micro_batch_size sequences, i.e. the "
                                              "gradient-accumulation steps). More microbatches = a smaller bubble.",
                                           ge=0)
    pipeline_virtual_stages: int = doc_field(1, "Stages per pipeline rank (interleaved schedules: >= 2, which "
                                                "shrinks the bubble by that factor).", ge=1)
    fsdp: FSDPConfig = doc_field(FSDPConfig(), "FSDP2 options (strategy: fsdp).")
    zero: ZeroConfig = doc_field(ZeroConfig(), "DeepSpeed ZeRO options (strategy: zero).")

    def check_world_size(self, world_size: int) -> None:
        """What only the launch decides: the number of processes must fit the layout (exit 2 otherwise)."""
        from bigtrain.parallel.mesh import Layout

        if self.strategy == "fsdp":
            Layout.from_config(self, world_size)  # raises with the numbers and a valid layout
            return
        if self.strategy == "single" and world_size > 1:
            raise ConfigError(
                f"parallel.strategy=single runs one process, but this launch has {world_size} processes; "
                f"use parallel.strategy=ddp, fsdp or zero, or launch one process."
            )

    @property
    def model_parallel_degrees(self) -> dict[str, int]:
        """The dimensions besides data parallelism that are switched on (key name -> degree)."""
        named = {"tensor_parallel": self.tensor_parallel, "context_parallel": self.context_parallel,
                 "pipeline_parallel": self.pipeline_parallel}
        return {k: v for k, v in named.items() if v > 1}

    def data_parallel_size(self, world_size: int) -> int:
        """How many different batches one step reads: the ranks left after the model-parallel dimensions
        (every tensor/context-parallel peer of a data-parallel rank reads the same batch)."""
        if self.strategy != "fsdp":
            return world_size
        return world_size // (self.tensor_parallel * self.context_parallel * self.pipeline_parallel)

    def data_parallel_rank(self, rank: int, world_size: int) -> int:
        """This rank's data-parallel index (the data pipeline's rank); see :class:`bigtrain.parallel.mesh.Layout`."""
        if self.strategy != "fsdp":
            return rank
        from bigtrain.parallel.mesh import Layout

        return Layout.from_config(self, world_size).data_rank(rank)

    def check_model(self, model: ModelConfig, seq_len: int) -> None:
        """Tensor/context/expert-parallel degrees against the model's shape and the sequence length (exit 2 with
        the numbers and the degrees that would work)."""
        tp, cp = self.tensor_parallel, self.context_parallel
        if tp > 1:
            sizes = {"model.num_heads": model.num_heads, "model.num_kv_heads": model.kv_heads,
                     "model.vocab_size": model.vocab_size,
                     "the SwiGLU hidden size (model.ffn_hidden_dim)": model.ffn_dim,
                     "model.max_seq_len": model.max_seq_len}
            bad = {k: v for k, v in sizes.items() if v % tp}
            if bad:
                common = math.gcd(*sizes.values())  # a degree fits when it divides every size, i.e. their gcd
                ok = [d for d in range(1, min(common, max(tp, 8) * 2) + 1) if common % d == 0][:8]
                raise ConfigError(
                    f"parallel.tensor_parallel={tp} must divide {', '.join(f'{k}={v}' for k, v in bad.items())} "
                    f"(each rank takes an equal share of the heads, key/value heads, vocabulary and hidden units); "
                    f"tensor_parallel values that fit this model: {', '.join(map(str, ok))}.")
            if model.fp8:
                raise ConfigError("model.fp8 does not compose with parallel.tensor_parallel in bigtrain yet (FP8 "
                                  "linears need their own tensor-parallel plan); set model.fp8=false or "
                                  "parallel.tensor_parallel=1.")
        if seq_len % (tp * cp):
            what = " x ".join(f"{k}={v}" for k, v in (("parallel.context_parallel", cp),
                                                       ("parallel.tensor_parallel", tp)) if v > 1)
            good = seq_len - seq_len % (tp * cp)
            raise ConfigError(
                f"data.seq_len={seq_len} must be divisible by {what} = {tp * cp} (context parallelism splits each "
                f"sequence over its ranks, and sequence parallelism splits each slice over the tensor-parallel "
                f"ranks); use data.seq_len={good or tp * cp} or {good + tp * cp}.")
        if cp > 1 and (model.num_heads // tp) % cp:
            raise ConfigError(
                f"parallel.context_parallel={cp} must divide the attention heads per tensor-parallel rank "
                f"(model.num_heads={model.num_heads} / tensor_parallel={tp} = {model.num_heads // tp}): attention "
                f"exchanges heads for sequence over the context-parallel ranks; use a context_parallel that "
                f"divides {model.num_heads // tp}.")
        self.check_experts(model)

    def check_experts(self, model: ModelConfig) -> None:
        """``expert_parallel`` against the model: an MoE model whose routed experts split evenly (exit 2 with
        the degrees that would work)."""
        ep = self.expert_parallel
        if ep == 1:
            return
        if model.moe is None:
            raise ConfigError(f"parallel.expert_parallel={ep} needs a Mixture-of-Experts model (a model.moe section, "
                              f"e.g. model.preset=moe-debug); this model is dense, so set "
                              f"parallel.expert_parallel=1.")
        experts = model.moe.num_experts
        if experts % ep:
            fits = ", ".join(str(d) for d in range(1, experts + 1) if experts % d == 0)
            raise ConfigError(f"parallel.expert_parallel={ep} must divide model.moe.num_experts={experts} (each "
                              f"expert-parallel rank holds an equal share of the routed experts); "
                              f"expert_parallel values that fit this model: {fits}.")

    def check_pipeline(self, model: ModelConfig) -> None:
        """Pipeline degrees against the model (stages of equal length) and what stages cannot share yet."""
        pp, virtual = self.pipeline_parallel, self.pipeline_virtual_stages
        interleaved = self.pipeline_schedule.startswith("interleaved")
        if interleaved and virtual < 2:
            raise ConfigError(f"parallel.pipeline_schedule={self.pipeline_schedule} runs several stages per rank; "
                              f"set parallel.pipeline_virtual_stages >= 2 (e.g. 2), or use pipeline_schedule=1f1b.")
        if not interleaved and virtual > 1:
            raise ConfigError(f"parallel.pipeline_virtual_stages={virtual} needs an interleaved schedule "
                              f"(parallel.pipeline_schedule=interleaved_1f1b or interleaved_zb); "
                              f"{self.pipeline_schedule} runs one stage per rank.")
        if pp == 1:
            return
        stages = pp * virtual
        if model.num_layers % stages:
            layers = model.num_layers
            fits = []
            pp_ok = [d for d in range(2, layers + 1) if layers % (d * virtual) == 0]
            if pp_ok:
                fits.append(f"pipeline_parallel values that fit with pipeline_virtual_stages={virtual}: "
                            f"{', '.join(map(str, pp_ok))}")
            if interleaved:
                virtual_ok = [v for v in range(2, layers // pp + 1) if layers % (pp * v) == 0]
                if virtual_ok:
                    fits.append(f"pipeline_virtual_stages values that fit with pipeline_parallel={pp}: "
                                f"{', '.join(map(str, virtual_ok))}")
            if not fits:
                fits.append(f"no pipeline layout cuts {layers} layers evenly with these settings; change "
                            f"model.num_layers to a multiple of {stages}")
            raise ConfigError(
                f"model.num_layers={layers} cannot be cut into {stages} pipeline stages of equal length "
                f"(parallel.pipeline_parallel={pp} x pipeline_virtual_stages={virtual}); {'; '.join(fits)}.")
        if model.tie_embeddings:
            raise ConfigError("parallel.pipeline_parallel > 1 needs model.tie_embeddings=false: the embedding lives "
                              "on the first stage and the output projection on the last, so they cannot share a "
                              "weight; set model.tie_embeddings=false.")
        if self.pipeline_schedule == "interleaved_zb":
            import torch.distributed.pipelining as pipelining

            if not hasattr(pipelining, "ScheduleInterleavedZeroBubble"):
                raise ConfigError("parallel.pipeline_schedule=interleaved_zb needs torch's "
                                  "ScheduleInterleavedZeroBubble, which this torch lacks; use interleaved_1f1b.")

    def check_microbatches(self, sequences_per_rank: int, accum_steps: int) -> int:
        """The pipeline's microbatch count for ``sequences_per_rank`` sequences per step (exit 2 if it does not fit)."""
        n = self.pipeline_microbatches or accum_steps
        pp = self.pipeline_parallel
        if pp == 1:
            return n
        if sequences_per_rank % n:
            raise ConfigError(f"parallel.pipeline_microbatches={n} does not divide the {sequences_per_rank} "
                              f"sequences each data-parallel rank gets per step; use a divisor of "
                              f"{sequences_per_rank}.")
        if n < pp or (self.pipeline_schedule.startswith("interleaved") and n % pp):
            need = "a multiple of" if self.pipeline_schedule.startswith("interleaved") else "at least"
            raise ConfigError(f"the pipeline gets {n} microbatches per step, but {self.pipeline_schedule} on "
                              f"{pp} pipeline ranks needs {need} {pp}; raise train.global_batch_tokens, lower "
                              f"train.micro_batch_size, or set parallel.pipeline_microbatches.")
        return n

    def validate(self, path: str) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"{path}.timeout_s: must be positive, got {self.timeout_s}.")
        if self.activation_checkpointing_every < 1:
            raise ConfigError(f"{path}.activation_checkpointing_every: must be >= 1.")
        if self.expert_parallel > 1 and self.strategy != "fsdp":
            raise ConfigError(
                f"{path}.expert_parallel={self.expert_parallel} needs {path}.strategy=fsdp (experts are split over an "
                f"expert-parallel group of the FSDP2 device mesh; {self.strategy} keeps every expert on every rank); "
                f"set {path}.strategy=fsdp, or {path}.expert_parallel=1.")
        if self.model_parallel_degrees and self.strategy != "fsdp":
            keys = ", ".join(f"{path}.{k}={v}" for k, v in self.model_parallel_degrees.items())
            raise ConfigError(
                f"{keys} needs {path}.strategy=fsdp (tensor, context and pipeline parallelism compose with FSDP2 "
                f"on one device mesh; {self.strategy} does not support them); set {path}.strategy=fsdp, or set the "
                f"degree{'s' if len(self.model_parallel_degrees) > 1 else ''} back to 1.")
