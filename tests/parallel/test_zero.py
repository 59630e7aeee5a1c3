"""DeepSpeed ZeRO (parallel.strategy=zero): the generated DeepSpeed JSON, and bad input.

Parity with one process (stages 1/2/3) is tests/parallel/test_parity.py; memory per rank is
tests/parallel/test_plan_vs_measured.py; resume and resharding is tests/checkpoint/test_reshard.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigtrain.parallel.config import ZeroConfig
from bigtrain.parallel.zero import deepspeed_config
from tests.helpers import cli

ENV = {"DS_ACCELERATOR": "cpu"}
BASE = {"compute_dtype": torch.float32, "micro_batch_size": 4, "accum_steps": 3, "world_size": 2, "grad_clip": 1.0,
        "on_cuda": False}


def ds(zero: ZeroConfig | None = None, **kw: object) -> dict:
    config = deepspeed_config(zero or ZeroConfig(), **{**BASE, **kw})  # type: ignore[arg-type]
    assert json.loads(json.dumps(config)) == config  # plain JSON: DeepSpeed is given exactly this
    return config


def test_batch_sizes_clipping_and_bigtrains_own_optimizer() -> None:
    config = ds(micro_batch_size=4, accum_steps=3, world_size=2, grad_clip=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 2  # DeepSpeed checks micro x accum x world == train_batch_size
    assert config["gradient_clipping"] == 0.5
    assert config["zero_force_ds_cpu_optimizer"] is False and config["zero_allow_untested_optimizer"] is True
    assert config["steps_per_print"] >= 1 << 30 and config["wall_clock_breakdown"] is False  # DeepSpeed stays quiet
    assert ds(world_size=8, accum_steps=1, micro_batch_size=2)["train_batch_size"] == 16


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_without_offload(stage: int) -> None:
    assert ds(ZeroConfig(stage=stage))["zero_optimization"] == {"stage": stage}


def test_offload_optimizer_and_params_pin_memory_only_on_cuda() -> None:
    zero = ZeroConfig(stage=3, offload_optimizer=True, offload_params=True)
    cpu = ds(zero)["zero_optimization"]
    assert cpu == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                   "offload_param": {"device": "cpu", "pin_memory": False}}
    cuda = ds(zero, on_cuda=True)["zero_optimization"]
    assert cuda["offload_optimizer"]["pin_memory"] is True and cuda["offload_param"]["pin_memory"] is True
    only_optimizer = ds(ZeroConfig(stage=2, offload_optimizer=True))["zero_optimization"]
    assert only_optimizer == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_precision_sections() -> None:
    fp32 = ds(compute_dtype=torch.float32)
    assert "bf16" not in fp32 and "fp16" not in fp32
    bf16 = ds(compute_dtype=torch.bfloat16)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp16 = ds(compute_dtype=torch.float16)
    # Dynamic loss scaling (loss_scale 0), starting at 2**16.
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and "bf16" not in fp16


def test_extra_is_merged_on_top_recursively() -> None:
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage": 1},
             "gradient_clipping": 2.0, "bf16": {"enabled": False}, "new_key": [1, 2]}
    zero = ZeroConfig(stage=3, offload_optimizer=True, extra=extra)
    config = ds(zero, compute_dtype=torch.bfloat16)
    # Nested dicts merge key by key (offload_optimizer survives); extra's values win.
    assert config["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                           "stage3_param_persistence_threshold": 0}
    assert config["gradient_clipping"] == 2.0 and config["bf16"] == {"enabled": False} and config["new_key"] == [1, 2]
    assert config["train_batch_size"] == 24  # untouched keys keep bigtrain's values
    # The config's own extra is not modified (a copy is merged).
    config["new_key"].append(3)
    config["zero_optimization"]["stage"] = 0
    assert extra == {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage": 1},
                     "gradient_clipping": 2.0, "bf16": {"enabled": False}, "new_key": [1, 2]}


def test_config_file_extra_reaches_the_generated_json() -> None:
    from bigtrain.config import load_config

    cfg = load_config("configs/debug.yaml", [
        "parallel.strategy=zero", "train.optimizer=adamw", "parallel.zero.stage=3",
        "parallel.zero.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    config = ds(cfg.parallel.zero)
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}


@pytest.mark.parametrize("overrides, words", [
    (("parallel.zero.stage=5",), "stage must be 0, 1, 2 or 3"),
    (("parallel.zero.stage=2", "parallel.zero.offload_params=true"), "needs stage 3"),
])
def test_bad_zero_config_is_a_user_error(overrides, words, tmp_path: Path) -> None:
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={tmp_path}", "parallel.strategy=zero",
               "train.optimizer=adamw", *overrides, env=ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_cpu_runs_skip_the_shared_memory_extension_build() -> None:
    """On the CPU accelerator DeepSpeed would JIT-compile its shm all-reduce extension (about a minute,
    needs a compiler) for an inference-only collective; bigtrain's import marks it unused."""
    pytest.importorskip("deepspeed")
    from bigtrain.parallel.zero import import_deepspeed

    deepspeed = import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None  # what TorchBackend calls at start-up: nothing is built
