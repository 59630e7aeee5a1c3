"""`bigtrain doctor [CONFIG]`: is this machine (and every rank of this launch) ready to train?

Run it under the same launcher as training (``torchrun ... -m bigtrain doctor CONFIG`` or
``srun ... launch/torchrun.sh``-style): every rank checks itself, probes matmul throughput and
(with several ranks) all-reduce bandwidth, then rank 0 prints one report with a line per rank.
Exit status 0 = no problem found, 1 = problems (each with what to fix), 2 = bad input.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from bigtrain.config import RunConfig

Print = Callable[[str], None]
EXIT_PROBLEMS = 1
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "SLURM_JOB_", "TORCHELASTIC_", "PET_")
ENV_SKIP = ("TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE")  # long and not actionable
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_DISTRIBUTED_DEBUG", "PYTORCH_CUDA_ALLOC_CONF",
            "SLURM_PROCID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_GPUS_ON_NODE", "HF_HOME", "HF_HUB_OFFLINE",
            "WANDB_MODE", "BIGTRAIN_PYTHON")


@dataclass
class RankReport:
    """What one rank found (sent to rank 0, so plain data only)."""

    rank: int
    host: str
    device: str
    device_name: str
    matmul_tflops: float | None = None
    peak_tflops: float | None = None
    allreduce_busbw_gbs: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions that decide whether a run works, without importing the heavy optional packages."""
    out = {"python": platform.python_version(), "bigtrain": _version("bigtrain"), "torch": torch.__version__,
           "cuda (torch build)": str(torch.version.cuda), "deepspeed": _version("deepspeed"),
           "triton": _version("triton")}
    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # a CUDA build without NCCL cannot run multi-GPU
            out["nccl"] = f"unavailable ({exc})"
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def environment() -> dict[str, str]:
    keys = set(ENV_KEYS) | {k for k in os.environ if k.startswith(ENV_PREFIXES)}
    return {k: os.environ[k] for k in sorted(keys) if k in os.environ and k not in ENV_SKIP}


def devices() -> list[str]:
    if not torch.cuda.is_available():
        cores = os.cpu_count() or 0
        return [(f"cpu: {platform.processor() or platform.machine()}, {cores} logical cores, torch threads "
                 f"{torch.get_num_threads()} (no CUDA device visible)")]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    return lines


def matmul_probe(device: torch.device, seconds: float = 1.0) -> float:
    """Sustained dense matmul FLOP/s: bf16 4096^2 on GPUs (their peak is quoted in bf16), fp32 512^2 on CPU."""
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10):
            a @ b
        iters += 10
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n**3 * iters / elapsed


def allreduce_probe(device: torch.device, world_size: int) -> float:
    """All-reduce bus bandwidth in GB/s (algbw x 2(n-1)/n, the figure nccl-tests print)."""
    import torch.distributed as dist

    numel = (64 << 20) // 4 if device.type == "cuda" else (8 << 20) // 4  # 64 MiB on GPUs, 8 MiB on CPU
    x = torch.ones(numel, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        dist.all_reduce(x)
    sync()
    iters = 5
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync()
    elapsed = (time.perf_counter() - t0) / iters
    return x.numel() * 4 / elapsed * 2 * (world_size - 1) / world_size / 1e9


def _memory_check(cfg: RunConfig, config: str, world_size: int, device: torch.device, local_world: int,
                  report: RankReport) -> str:
    """Whether the config's memory plan fits this rank's device (or its share of host memory on CPU)."""
    from bigtrain.plan import GIB, plan_memory

    if cfg.run.device == "cuda" and device.type != "cuda":
        report.problems.append("run.device=cuda but this rank sees no CUDA device: check CUDA_VISIBLE_DEVICES, the "
                               "driver (nvidia-smi) and that torch is a CUDA build")
    strategy = cfg.parallel.strategy
    if strategy == "single" and world_size > 1:
        report.problems.append(f"parallel.strategy=single runs one process, but this launch has {world_size} ranks; "
                               f"use parallel.strategy=ddp, fsdp or zero")
        return "skipped (strategy single on several ranks)"
    from bigtrain.errors import UserError

    try:
        plan = plan_memory(cfg, world_size, strategy, device="cuda" if device.type == "cuda" else "cpu")
    except UserError as exc:
        report.problems.append(f"config on {world_size} ranks: {exc}")
        return "n/a"
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        where = f"{capacity / GIB:.1f} GiB on {report.device_name}"
    else:
        import psutil

        capacity = psutil.virtual_memory().available // max(1, local_world)
        where = f"{capacity / GIB:.1f} GiB of available host memory per local rank"
    fits = plan.peak <= capacity
    if not fits:
        report.problems.append(f"the memory plan needs {plan.peak / GIB:.2f} GiB per rank, more than {where}: see "
                               f"`bigtrain plan {config} --world-size {world_size}` for a backend/setting that fits")
    return f"{plan.peak / GIB:.2f} GiB per rank ({strategy}) vs {where}: {'fits' if fits else 'does NOT fit'}"


def run_doctor(config: str | None = None, overrides: list[str] | None = None, *, probe_s: float = 1.0,
               echo: Print = print) -> int:
    """Check this rank (and, under a launcher, all ranks); rank 0 prints the report. Returns the exit status."""
    import torch.distributed as dist

    from bigtrain.parallel import dist as bdist
    from bigtrain.train.metrics import peak_flops

    rank, local_rank, world = bdist.env_world()
    cfg: RunConfig | None = None
    if config:  # bad input fails first (ConfigError -> the CLI's status 2), before any probe
        from bigtrain.config import load_config

        cfg = load_config(config, list(overrides or []))
    device = bdist.resolve_device("auto", local_rank)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    report = RankReport(rank=rank, host=socket.gethostname(), device=str(device), device_name=device_name)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda" and local_world > torch.cuda.device_count():
        report.problems.append(f"{local_world} ranks on this node but only {torch.cuda.device_count()} visible GPUs: "
                               f"lower --nproc-per-node or fix CUDA_VISIBLE_DEVICES")
    if device.type == "cpu" and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        report.warnings.append("OMP_NUM_THREADS is unset with several ranks per node: threads oversubscribe the cores")
    if world > 1:
        if not os.environ.get("MASTER_ADDR"):
            report.problems.append(
                "WORLD_SIZE > 1 but MASTER_ADDR is unset: launch with torchrun or launch/torchrun.sh"
            )
            return _finish([report], {}, [], "", echo)
        backend = bdist.resolve_backend("auto", device)
        bdist.init_process_group(bdist.DistInfo(rank, local_rank, world, device), backend, timeout_s=300)
    # Probes: a GPU far below its peak has a clock, power, thermal or sharing problem.
    report.matmul_tflops = matmul_probe(device, probe_s) / 1e12
    peak = peak_flops(device)
    if peak:
        report.peak_tflops = peak / 1e12
        ratio = report.matmul_tflops / report.peak_tflops
        if ratio < 0.1:
            report.problems.append(f"matmul reaches {ratio:.0%} of the device's peak: check nvidia-smi for clocks, "
                                   f"power caps, ECC/XID errors and other processes on this GPU")
        elif ratio < 0.4:
            report.warnings.append(f"matmul reaches only {ratio:.0%} of peak (expect 50-80% on an idle GPU)")
    if world > 1:
        try:
            report.allreduce_busbw_gbs = allreduce_probe(device, world)
        except Exception as exc:  # a broken fabric shows up here rather than hours into a run
            report.problems.append(
                f"all-reduce failed: {exc}; check NCCL_SOCKET_IFNAME / NCCL_IB_HCA and the network"
            )
    memory = _memory_check(cfg, config, world, device, local_world, report) if config and cfg is not None else ""
    reports = [report]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, report)
        reports = gathered
    status = _finish(reports, versions(), devices(), memory, echo if rank == 0 else (lambda _: None))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


def _finish(reports: list[RankReport], vers: dict[str, str], devs: list[str], memory: str, echo: Print) -> int:
    """Print the report (rank 0) and return the exit status every rank agrees on."""
    me = reports[0]
    lines = [f"bigtrain doctor: {len(reports)} rank(s); rank 0 on {me.host}"]
    if vers:
        lines.append("versions   " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    for d in devs:
        lines.append(f"device     {d}")
    env = environment()
    shown_env = " ".join(f"{k}={v}" for k, v in env.items()) if env else "(no launcher/NCCL/Slurm variables set)"
    lines.append("env        " + shown_env)
    if memory:
        lines.append(f"memory     {memory}")
    lines.append("")
    lines.append("rank  host                  device          matmul TFLOP/s  % peak  all-reduce busbw GB/s")
    for r in reports:
        pct = f"{r.matmul_tflops / r.peak_tflops:.0%}" if r.matmul_tflops and r.peak_tflops else "n/a"
        bw = f"{r.allreduce_busbw_gbs:.2f}" if r.allreduce_busbw_gbs is not None else "-"
        lines.append(f"{r.rank:<5} {r.host[:20]:<21} {r.device:<15} {r.matmul_tflops or 0:>14.3f}  {pct:>6}  {bw:>21}")
    problems = _by_message(reports, "problems")
    warnings = _by_message(reports, "warnings")
    lines.append("")
    for w, ranks in warnings.items():
        lines.append(f"warning ({ranks}): {w}")
    for p, ranks in problems.items():
        lines.append(f"PROBLEM ({ranks}): {p}")
    lines.append(f"doctor: {len(problems)} problem(s) found" if problems else "doctor: OK, no problems found")
    echo("\n".join(lines))
    sys.stdout.flush()
    return EXIT_PROBLEMS if problems else 0


def _by_message(reports: list[RankReport], kind: str) -> dict[str, str]:
    """The same message from many ranks is printed once, with the ranks it came from."""
    ranks: dict[str, list[int]] = {}
    for r in reports:
        for message in getattr(r, kind):
            ranks.setdefault(message, []).append(r.rank)
    return {m: ("all ranks" if len(rs) == len(reports) > 1 else "rank " + ",".join(map(str, rs)))
            for m, rs in ranks.items()}
