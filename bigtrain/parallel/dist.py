"""Process-group facts: rank, world size, device. Single-process runs need no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigtrain import messages


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local CUDA device when present, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from bigtrain.errors import UserError

        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun / srun environment (0, 0, 1 when absent)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def install_fault_handlers() -> None:
    """Stack dumps instead of silent deaths and hangs (idempotent).

    A crash in native code (segfault, abort in NCCL/CUDA) prints every thread's Python stack;
    ``kill -USR2 <pid>`` prints them on demand from a rank that seems stuck, without stopping it.
    """
    import faulthandler
    import io
    import signal
    import sys

    # faulthandler writes to a file descriptor; a replaced sys.stderr (a test's capture, a notebook) may
    # have none, and then the process's own stderr is the place for a crash report.
    stream = sys.stderr
    try:
        stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        stream = sys.__stderr__
    if not faulthandler.is_enabled():
        faulthandler.enable(file=stream, all_threads=True)
    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, file=stream, all_threads=True, chain=False)


def init(requested_device: str = "auto") -> DistInfo:
    """Describe this process; a process group is only created by multi-rank strategies.

    Also tells :mod:`bigtrain.messages` this process's rank, so user-facing messages print once.
    """
    install_fault_handlers()
    rank, local_rank, world = env_world()
    messages.set_rank(rank, world)
    return DistInfo(rank, local_rank, world, resolve_device(requested_device, local_rank))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_backend(requested: str, device: torch.device) -> str:
    """auto → nccl for CUDA devices, gloo for CPU; nccl on a CPU run is a user error."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        from bigtrain.errors import UserError

        raise UserError("parallel.backend=nccl needs CUDA devices; this run is on the CPU. "
                        "Use parallel.backend=auto or gloo.")
    return requested


def init_process_group(info: DistInfo, backend: str, timeout_s: int) -> None:
    """Join the default process group of a multi-process launch (torchrun / srun set the env)."""
    import datetime

    if info.world_size <= 1 or is_initialized():
        return
    # nccl: eager init, bound to this rank's GPU
    device_id = info.device if backend == "nccl" else None
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def ensure_process_group(info: DistInfo, backend: str, timeout_s: int) -> None:
    """Make sure a process group exists; a one-process run gets a private one-rank group.

    DDP and FSDP2 need a process group even for one process (e.g. FSDP2 CPU offload on one GPU);
    an in-memory store avoids needing MASTER_ADDR or a free port.
    """
    import datetime

    if is_initialized():
        return
    if info.world_size > 1:
        init_process_group(info, backend, timeout_s)
        return
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=timeout_s))
