"""Communication volume per training step and layout: bytes counted at the collectives on gloo (CPU) against
``bigtrain plan``'s estimate (bigtrain.plan_layout.traffic_bytes), same model, same run.

Each layout trains a tiny decoder on in-process gloo ranks (torchrun); one step warms up, the next is
measured under a dispatch mode that sees every c10d and functional collective (DTensor's, FSDP2's,
the pipeline's sends, the context-parallel all-to-alls). Each call is charged the bytes one rank
puts on the wire in a ring (all-gather: (n-1)/n of the output, reduce-scatter and all-to-all:
(n-1)/n of the input, all-reduce: twice that, send: the tensor) and attributed to the mesh
dimension whose group it ran on. Reported per rank (mean over ranks), per dimension.

    DS_ACCELERATOR=cpu python bench/comm_volume.py [--out bench/results/comm-volume-cpu-2core.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchinfo import REPO, cpu_name, git_commit, publish, torchrun_python  # bench/ is on sys.path when run as a script

TINY = ["model.num_layers=4", "model.dim=64", "model.num_heads=4", "model.num_kv_heads=2", "model.tie_embeddings=false",
        "data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.precision=fp32",
        "train.max_steps=2", "eval.every_steps=0", "eval.at_end=false", "checkpoint.at_end=false",
        "log.sample_at_end=false", "log.console=false", "run.device=cpu", "run.num_threads=1",
        "parallel.strategy=fsdp"]
LAYOUTS = {  # name -> (ranks, overrides)
    "fsdp2": (2, []),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "cp2": (2, ["parallel.context_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "fsdp2 x tp2": (4, ["parallel.tensor_parallel=2"]),
    "tp2 x cp2": (4, ["parallel.tensor_parallel=2", "parallel.context_parallel=2"]),
}
DIMS = ("tp", "cp", "pp", "fsdp")


def _charge(name: str, args: tuple[Any, ...], size: int) -> float:
    """Bytes one rank sends for collective ``name`` on a group of ``size`` ranks."""
    import torch

    def nbytes(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(y) for y in x)
        return 0

    share = (size - 1) / size
    if "allreduce" in name or "all_reduce" in name:
        return 2 * share * nbytes(args[0])
    if "_allgather_base_" in name:
        return share * nbytes(args[0])  # (output, input, ...)
    if "all_gather_into_tensor" in name:
        return (size - 1) * nbytes(args[0])  # functional: (input, group_size, group_name)
    if "_reduce_scatter_base_" in name:
        return share * nbytes(args[1])
    if "reduce_scatter_tensor" in name:
        return share * nbytes(args[0])
    if "alltoall_base_" in name:
        return share * nbytes(args[1])
    if "all_to_all_single" in name:
        return share * nbytes(args[0])
    if name.startswith("c10d.send"):
        return float(nbytes(args[0]))
    if "broadcast" in name:
        return share * nbytes(args[0])
    return 0.0


def rank_main(out_dir: str, overrides: list[str], result: str) -> None:
    """In one rank: build the Trainer, run a warm-up step, count one step's collectives by mesh dimension."""
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from bigtrain.config import load_config
    from bigtrain.train.trainer import Trainer

    trainer = Trainer(load_config("configs/debug.yaml", [f"run.out_dir={out_dir}", *TINY, *overrides]))
    mesh = trainer.strategy.mesh
    groups = {dim: frozenset(getattr(mesh, dim).mesh.flatten().tolist()) for dim in DIMS}
    counted: dict[str, float] = defaultdict(float)
    names: dict[str, int] = defaultdict(int)

    def group_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.ScriptObject):
                return dist.ProcessGroup.unbox(value)
            if isinstance(value, str):  # functional collectives name their group (other strings: reduce ops)
                try:
                    return torch._C._distributed_c10d._resolve_process_group(value)
                except RuntimeError:
                    continue
        return None

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            name = str(func)
            if "c10d" in name and "wait" not in name and "_wrap_tensor_autograd" not in name:
                group = group_of(args, kwargs)
                if group is not None and group.size() > 1:
                    ranks = frozenset(dist.get_process_group_ranks(group))
                    dim = next((d for d in DIMS if groups[d] == ranks), "other")
                    counted[dim] += _charge(name, args, group.size())
                    names[name] += 1
            return func(*args, **kwargs)

    trainer.train_step()  # warm-up: lazy initialization, the pipeline's shape exchange
    with Count():
        trainer.train_step()
    trainer.loader.close()
    Path(f"{result}.{dist.get_rank()}").write_text(json.dumps({"bytes": counted, "ops": names}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from bigtrain.config import load_config
    from bigtrain.parallel.mesh import Layout
    from bigtrain.plan_layout import traffic_bytes

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": f"{REPO / 'bench'}:{REPO}"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (ranks, overrides)) in enumerate(LAYOUTS.items()):
            result = str(Path(tmp) / f"result{i}")
            code = (f"from comm_volume import rank_main; "
                    f"rank_main({str(Path(tmp) / f'run{i}')!r}, {overrides!r}, {result!r})")
            proc = torchrun_python(ranks, code, env)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            per_rank = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(ranks)]
            measured = {d: sum(r["bytes"].get(d, 0.0) for r in per_rank) / ranks for d in (*DIMS, "other")}
            cfg = load_config("configs/debug.yaml", [*TINY, *overrides])
            planned = traffic_bytes(cfg, Layout.from_config(cfg.parallel, ranks), device="cpu")
            rows.append((name, ranks, measured, planned))
            print(f"{name}: measured {sum(measured.values()) / 1e6:.2f} MB/step/rank, planned "
                  f"{sum(planned.values()) / 1e6:.2f}", flush=True)
    out = io.StringIO()
    out.write("# Communication volume per step: counted at the collectives vs bigtrain plan's estimate\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {git_commit()}\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), gloo; model: {' '.join(TINY[:5])}, "
              f"seq 128, 1024 tokens/step, micro-batch 4, fp32\n")
    out.write("- bytes one rank sends per optimizer step (mean over ranks), MB; measured per mesh dimension "
              "(other = groups that are no single dimension, e.g. the trainer's loss all-reduce). A group that is "
              "two dimensions at once is charged to the first of tp, cp, pp, fsdp: with cp2 alone, FSDP2 shards "
              "over the same two ranks, so its traffic shows under cp; compare the totals there.\n\n")
    out.write("| layout | ranks | dim | measured MB | planned MB | planned / measured |\n"
              "|---|---:|---|---:|---:|---:|\n")
    for name, ranks, measured, planned in rows:
        for dim in (*DIMS, "other"):
            got, want = measured.get(dim, 0.0), planned.get(dim, 0.0)
            if got == 0 and want == 0:
                continue
            ratio = f"{want / got:.2f}" if got else "-"
            out.write(f"| {name} | {ranks} | {dim} | {got / 1e6:.3f} | {want / 1e6:.3f} | {ratio} |\n")
        total_got, total_want = sum(measured.values()), sum(planned.values())
        out.write(f"| {name} | {ranks} | **total** | {total_got / 1e6:.3f} | {total_want / 1e6:.3f} | "
                  f"{total_want / total_got:.2f} |\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
