"""The ``parallel`` config section (and its per-backend subsections)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
    fsdp: FSDPConfig = doc_field(FSDPConfig(), "FSDP2 options (strategy: fsdp).")
    zero: ZeroConfig = doc_field(ZeroConfig(), "DeepSpeed ZeRO options (strategy: zero).")

    def check_world_size(self, world_size: int) -> None:
        """What only the launch decides: the number of processes must fit the layout (exit 2 otherwise)."""
        if self.strategy == "single" and world_size > 1:
            raise ConfigError(
                f"parallel.strategy=single runs one process, but this launch has {world_size} processes; "
                f"use parallel.strategy=ddp, fsdp or zero, or launch one process."
            )
        replicas = self.fsdp.replicate_degree
        if self.strategy == "fsdp" and world_size % replicas:
            raise ConfigError(
                f"parallel.fsdp.replicate_degree={replicas} does not divide the {world_size} processes of this "
                f"launch; use a divisor of {world_size} (e.g. the number of nodes), or 1 for plain FSDP."
            )

    def validate(self, path: str) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"{path}.timeout_s: must be positive, got {self.timeout_s}.")
        if self.activation_checkpointing_every < 1:
            raise ConfigError(f"{path}.activation_checkpointing_every: must be >= 1.")
