"""held_state_bytes measures what a rank holds; plan_memory predicts it (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.model import build_on_meta, count_parameters
from bigtrain.optim.optimizer import build_adamw
from bigtrain.parallel.memory import held_state_bytes
from bigtrain.plan import plan_memory
from tests.helpers import free_port

DEBUG = ["train.optimizer=adamw", "train.micro_batch_size=2"]
TIED = [*DEBUG, "model.tie_embeddings=true"]  # the demo config unties its output projection


def _materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Allocate on the CPU and fill with small values (memory does not depend on the init)."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, vocab: int) -> None:
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    opt.step()  # grads are kept (no zero_grad): params, grads and moments all exist now


def _close(measured: int, planned: int, rel: float = 0.10) -> bool:
    return abs(measured - planned) <= rel * max(measured, planned)


def test_plain_model_params_grads_optimizer() -> None:
    cfg = load_config("configs/debug.yaml", TIED)
    model = _materialize(build_on_meta(cfg.model))
    opt = _adamw(model)
    n = count_parameters(cfg.model)
    assert cfg.model.tie_embeddings
    held = held_state_bytes(model, opt)
    assert held == {"params": 4 * n, "grads": 0, "optimizer": 0, "total": 4 * n}  # tied weight counted once
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    model(tokens, tokens).backward()
    assert held_state_bytes(model, opt)["grads"] == 4 * n
    opt.step()
    held = held_state_bytes(model, opt)
    num_tensors = len(list(model.parameters()))
    assert held["optimizer"] == 2 * 4 * n + 4 * num_tensors  # exp_avg + exp_avg_sq, one fp32 step scalar each
    assert held["total"] == held["params"] + held["grads"] + held["optimizer"]


def test_untied_output_counts_both_matrices() -> None:
    tied = load_config("configs/debug.yaml", TIED)
    untied = load_config("configs/debug.yaml", [*DEBUG, "model.tie_embeddings=false"])
    a = held_state_bytes(_materialize(build_on_meta(tied.model)), None)["params"]
    b = held_state_bytes(_materialize(build_on_meta(untied.model)), None)["params"]
    assert b - a == 4 * tied.model.vocab_size * tied.model.dim


def test_views_of_one_storage_count_once() -> None:
    flat = torch.zeros(100)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(flat[:60].view(6, 10))
    model.b = torch.nn.Parameter(flat[60:])
    assert held_state_bytes(model, None)["params"] == 400


def test_plan_single_matches_measured_debug() -> None:
    cfg = load_config("configs/debug.yaml", DEBUG)
    model = _materialize(build_on_meta(cfg.model))
    opt = _adamw(model)
    _one_step(model, opt, cfg.model.vocab_size)
    held = held_state_bytes(model, opt)
    plan = plan_memory(cfg, 1, "single", device="cpu")
    assert plan.compute_dtype == "fp32"
    for key, planned in (("params", plan.params), ("grads", plan.grads), ("optimizer", plan.optimizer),
                         ("total", plan.state)):
        assert _close(held[key], planned), (key, held[key], planned)



@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_counts_inner_parameters(one_rank_group) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = load_config("configs/debug.yaml", DEBUG)
    model = DDP(_materialize(build_on_meta(cfg.model)), gradient_as_bucket_view=True)  # as DDPStrategy
    opt = _adamw(model)
    _one_step(model, opt, cfg.model.vocab_size)
    held = held_state_bytes(model, opt)
    n = count_parameters(cfg.model)
    assert held["params"] == 4 * n and _close(held["grads"], 4 * n, 0.02)  # the buckets, counted once
    plan = plan_memory(cfg, 1, "ddp", device="cpu")
    assert _close(held["total"], plan.state)


def test_fsdp2_dtensor_shards_count_local_bytes(one_rank_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # An odd vocabulary makes FSDP2 pad dim-0 shards; one rank still exercises the DTensor path.
    cfg = load_config("configs/debug.yaml", [*DEBUG, "model.vocab_size=4099"])
    model = build_on_meta(cfg.model)
    mesh = init_device_mesh("cpu", (1,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _materialize(model)
    assert any(type(p).__name__ == "DTensor" for p in model.parameters())
    opt = _adamw(model)
    _one_step(model, opt, cfg.model.vocab_size)
    held = held_state_bytes(model, opt)
    plan = plan_memory(cfg, 1, "fsdp", device="cpu")
    for key, planned in (("params", plan.params), ("grads", plan.grads), ("optimizer", plan.optimizer)):
        assert _close(held[key], planned), (key, held[key], planned)
