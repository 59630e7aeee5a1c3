"""The parallel layout: rank coordinates, data ranks, and every bad layout refused with the numbers and a fix."""
from __future__ import annotations

import pytest

from bigtrain.config import load_config
from bigtrain.parallel.mesh import Layout
from bigtrain.sections import ConfigError
from tests.helpers import cli

FSDP = "parallel.strategy=fsdp"


def layout(world: int, *overrides: str) -> Layout:
    return Layout.from_config(load_config("configs/debug.yaml", [FSDP, *overrides]).parallel, world)


def test_coordinates_are_row_major_with_tp_innermost() -> None:
    lay = layout(8, "parallel.tensor_parallel=2", "parallel.context_parallel=2")
    assert (lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp) == (1, 2, 2, 2)
    assert lay.world_size == 8 and lay.data_parallel_size == 2
    assert [lay.coordinates(r)["tp"] for r in range(8)] == [0, 1] * 4
    assert [lay.coordinates(r)["cp"] for r in range(8)] == [0, 0, 1, 1] * 2
    # Tensor- and context-parallel peers read the same batch: ranks 0-3 are data rank 0, 4-7 data rank 1.
    assert [lay.data_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lay.describe() == "dp_shard 2 x cp 2 x tp 2"


def test_hsdp_replicas_are_outermost() -> None:
    lay = layout(8, "parallel.tensor_parallel=2", "parallel.fsdp.replicate_degree=2")
    assert (lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp) == (2, 2, 1, 2)
    assert [lay.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_batch_splits_over_data_parallel_ranks_only() -> None:
    cfg = load_config("configs/debug.yaml", [FSDP, "parallel.tensor_parallel=2", "train.global_batch_tokens=2048",
                                             "data.seq_len=256", "train.micro_batch_size=2"])
    assert cfg.check_launch(4) == (8, 2)  # 8 sequences over 2 data-parallel ranks x micro 2 -> 2 micro-steps
    assert cfg.parallel.data_parallel_size(4) == 2 and cfg.parallel.data_parallel_rank(3, 4) == 1


@pytest.mark.parametrize(("world", "overrides", "expected"), [
    (6, ["parallel.tensor_parallel=4"],
     ["parallel.tensor_parallel=4 needs a multiple of 4 processes, but there are 6",
      "parallel.tensor_parallel in {1, 2, 3, 6}", "(4, 8, 12, ...)"]),
    (4, ["parallel.tensor_parallel=2", "parallel.context_parallel=4"],
     ["parallel.context_parallel=4 x parallel.tensor_parallel=2 needs a multiple of 8 processes, but there are 4",
      "parallel.context_parallel in {1, 2}", "parallel.tensor_parallel in {1}"]),
])
def test_world_size_that_does_not_factor(world: int, overrides: list[str], expected: list[str]) -> None:
    cfg = load_config("configs/debug.yaml", [FSDP, *overrides, "model.num_heads=8", "model.dim=256"])
    with pytest.raises(ConfigError) as info:
        cfg.check_launch(world)
    for part in expected:
        assert part in str(info.value), str(info.value)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["parallel.tensor_parallel=3"], ["parallel.tensor_parallel=3 must divide model.num_heads=4",
                                      "model.vocab_size=4096", "values that fit this model: 1, 2, 4"]),
    (["parallel.tensor_parallel=4", "model.num_kv_heads=2"],
     ["must divide model.num_kv_heads=2", "values that fit this model: 1, 2"]),
    (["parallel.context_parallel=3"], ["data.seq_len=64 must be divisible by parallel.context_parallel=3 = 3",
                                       "use data.seq_len=63 or 66"]),
    (["parallel.tensor_parallel=2", "parallel.context_parallel=4"],
     ["parallel.context_parallel=4 must divide the attention heads per tensor-parallel rank",
      "model.num_heads=4 / tensor_parallel=2 = 2"]),
    (["parallel.tensor_parallel=2", "model.fp8=true"], ["model.fp8 does not compose with parallel.tensor_parallel"]),
    (["parallel.strategy=ddp", "parallel.tensor_parallel=2"],
     ["parallel.tensor_parallel=2 needs parallel.strategy=fsdp", "ddp does not support them"]),
    (["parallel.strategy=zero", "parallel.context_parallel=2"],
     ["parallel.context_parallel=2 needs parallel.strategy=fsdp", "zero does not support them"]),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved_zb", "parallel.pipeline_virtual_stages=2",
      "model.tie_embeddings=false",
      "train.compile=true"],
     ["a compiled block's backward cannot be split",
      "parallel.pipeline_schedule=interleaved_1f1b with train.compile=true"]),
])
def test_bad_layout_for_the_model(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/debug.yaml", [FSDP, *overrides])
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_config_check_exits_2_with_the_suggestion() -> None:
    """What launch/torchrun.sh and the Slurm script run before starting ranks."""
    proc = cli("config", "check", "--world-size", "6", "configs/debug.yaml", FSDP, "parallel.tensor_parallel=4")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "parallel.tensor_parallel in {1, 2, 3, 6}" in proc.stderr, proc.stderr


def test_expert_parallel_splits_data_and_context_parallel_ranks() -> None:
    moe = ["model.moe.num_experts=8", "parallel.expert_parallel=4"]
    lay = layout(8, *moe, "parallel.context_parallel=2", "model.num_heads=8")
    assert (lay.dp_shard, lay.cp, lay.ep) == (4, 2, 4)
    assert lay.expert_fsdp_size == 2 and lay.data_parallel_size == 4  # ep leaves the data ranks alone
    assert lay.describe() == "dp_shard 4 x cp 2 (ep 4)"
    hsdp = layout(8, *moe, "parallel.fsdp.replicate_degree=2")
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.ep, hsdp.expert_fsdp_size) == (2, 4, 4, 2)
    # Dense layouts do not change: no ep.
    assert layout(8) == Layout(dp_shard=8) and layout(8).describe() == "dp_shard 8"


def test_expert_parallel_that_does_not_fit_the_launch() -> None:
    cfg = load_config("configs/debug.yaml", [FSDP, "model.moe.num_experts=8", "parallel.expert_parallel=4",
                                             "parallel.fsdp.replicate_degree=2", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError) as info:
        cfg.check_launch(4)  # 2 replicas x dp_shard 2: the 4 expert-parallel ranks must come from dp_shard x cp = 2
    message = str(info.value)
    assert "parallel.expert_parallel=4 must divide the data-, context- and tensor-parallel ranks" in message, message
    assert "(dp_shard 2 = 2 on 4 processes" in message and "values that fit this launch: 1, 2" in message, message
    assert "launch a multiple of 8 processes" in message, message
    assert cfg.check_launch(8) == (24, 3)  # 24 sequences of 64 over 8 ranks x micro 1
