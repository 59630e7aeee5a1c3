"""Single-GPU training throughput: bigtrain's backends and kernel variants vs a plain PyTorch loop.

For each preset (model shape + sequence length) it measures, on one device:
  * bigtrain steps through each backend (single / ddp / fsdp / zero, world size 1) and each variant:
    eager, compile (train.compile), triton (model.kernels=triton), compile+triton, fp8 (model.fp8);
  * a minimal plain-PyTorch reference loop (the same Decoder with torch ops, SDPA, torch.compile of
    the whole model, fused AdamW on CUDA, bf16 autocast, clipping) — bigtrain's ratio is against it.
Every configuration runs in its own subprocess (clean compile caches, allocator and process group),
on synthetic random tokens (no data loading: this measures the step), with gradient accumulation 1.
After ``--warmup`` steps, each of ``--steps`` (>= 50 for GPU results) is timed with a device sync
at its end; the table shows the median step time, median tokens/s, MFU and peak memory.

MFU = tokens/s x (6N + 12·L·H·Q·T) / peak, N counting a tied embedding once, recompute never
counted, peak = 989 TFLOP/s dense bf16 on H100 SXM / H200 (bigtrain.train.metrics.peak_flops).

    python bench/throughput.py                      # all presets, backends, variants (GPU; long)
    python bench/throughput.py --presets gpt2-124m@1024 --backends single --variants eager,compile
    python bench/throughput.py --smoke              # tiny CPU run that proves the script works
Results: --out bench/results/throughput-<device>.md (default: printed only).
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (train.compile, model.kernels, model.fp8)
    "eager": (False, "torch", False),
    "compile": (True, "torch", False),
    "triton": (False, "triton", False),
    "compile+triton": (True, "triton", False),
    "fp8": (True, "torch", True),  # FP8 without compile is slow by design (unfused casts); torchtitan pairs them too
}
BACKENDS = ("single", "ddp", "fsdp", "zero")
# preset@seq -> default micro-batch (sequences per step) for an 80 GB GPU in bf16.
GPU_PRESETS = {"gpt2-124m@1024": 32, "llama-1b@2048": 8, "llama-1b@8192": 2, "gpt2-1.5b@1024": 8}
SMOKE_MODEL = {"vocab_size": 512, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64}


@dataclass
class Job:
    """One measured configuration (serialized to the child process as JSON)."""

    preset: str
    seq: int
    micro_batch: int
    backend: str  # a bigtrain backend, or "plain" for the reference loop
    variant: str
    steps: int
    warmup: int
    device: str
    precision: str

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq


# --------------------------------------------------------------------------- child side


def model_config(job: Job, kernels: str, fp8: bool) -> Any:
    from bigtrain.model import ModelConfig
    from bigtrain.sections import parse_section

    base: dict[str, Any] = dict(SMOKE_MODEL) if job.preset == "smoke" else {"preset": job.preset}
    base.update(max_seq_len=max(job.seq, base.get("max_seq_len", 0)), kernels=kernels, fp8=fp8)
    return parse_section(ModelConfig, base, "model")


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS on CPU)


def timed_steps(job: Job, device: Any, step: Any) -> list[float]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step()``; seconds per step."""
    import torch

    times = []
    for i in range(job.warmup + job.steps):
        if i == job.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= job.warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_bigtrain(job: Job) -> dict[str, Any]:
    """The trainer's step (Trainer.train_step's calls, through the Strategy) on synthetic tokens."""
    import torch

    from bigtrain.model import build_on_meta
    from bigtrain.optim.optimizer import build_adamw
    from bigtrain.parallel import dist
    from bigtrain.parallel.config import ParallelConfig
    from bigtrain.parallel.strategy import build_strategy
    from bigtrain.sections import parse_section

    compile_, kernels, fp8 = VARIANTS[job.variant]
    mcfg = model_config(job, kernels, fp8)
    pcfg = parse_section(ParallelConfig, {"strategy": job.backend}, "parallel")
    info = dist.init(job.device)
    strategy = build_strategy(pcfg, info, precision=job.precision, compile=compile_,
                              micro_batch_size=job.micro_batch, grad_clip=1.0, accum_steps=1)
    model, opt = strategy.wrap(build_on_meta(mcfg), lambda m: build_adamw(
        m, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8), seed=0)
    gen = torch.Generator(device=info.device).manual_seed(0)
    data = torch.randint(0, mcfg.vocab_size, (job.micro_batch, job.seq + 1), device=info.device, generator=gen)
    inputs, targets = data[:, :-1], data[:, 1:]
    model.train()

    def step() -> None:
        with strategy.autocast():
            loss = model(inputs, targets)
        strategy.backward(loss)
        strategy.clip_grad_norm(model, 1.0)
        strategy.step(opt)

    times = timed_steps(job, info.device, step)
    return {"times": times, "peak_gib": peak_memory_gib(info.device), "device_name": device_name(info.device),
            "kernels": short_kernels(mcfg, info.device, strategy.compute_dtype), "cfg": mcfg}


def short_kernels(mcfg: Any, device: Any, dtype: Any) -> str:
    """What really ran: fused-op backend (after any fallback), SDPA kernel, FP8 (the header line, compressed)."""
    from bigtrain.kernels import dispatch
    from bigtrain.kernels.attention import sdpa_backend

    ops = mcfg.kernels
    if ops == "triton" and dispatch.fallback_reason(ops, device):
        ops = f"torch (triton n/a on {device.type})"
    fp8 = ", fp8" + (" emulated" if device.type != "cuda" else "") if mcfg.fp8 else ""
    return f"ops {ops}, sdpa {sdpa_backend(device, dtype, mcfg.head_dim)}{fp8}"


def run_plain(job: Job) -> dict[str, Any]:
    """The hand-written reference: same Decoder (torch ops), whole-model compile, fused AdamW."""
    import torch

    from bigtrain.model import build_on_meta, materialize
    from bigtrain.parallel.dist import resolve_device
    from bigtrain.parallel.strategy import resolve_precision

    device = resolve_device(job.device)
    mcfg = model_config(job, "torch", False)
    model = materialize(build_on_meta(mcfg), device, seed=0)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if fused else {"foreach": True}))
    if job.variant == "compile":
        model = torch.compile(model)
    dtype = resolve_precision(job.precision, device)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, mcfg.vocab_size, (job.micro_batch, job.seq + 1), device=device, generator=gen)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed_steps(job, device, step)
    return {"times": times, "peak_gib": peak_memory_gib(device), "device_name": device_name(device),
            "kernels": "plain PyTorch", "cfg": mcfg}


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def child_main(payload: str) -> None:
    """Measure one Job and print one JSON line (``RESULT {...}``) for the parent."""
    job = Job(**json.loads(payload))
    from bigtrain.model import flops_per_token
    from bigtrain.parallel.dist import resolve_device
    from bigtrain.train.metrics import peak_flops

    out = run_plain(job) if job.backend == "plain" else run_bigtrain(job)
    times = out.pop("times")
    cfg = out.pop("cfg")
    median = statistics.median(times)
    tokens_per_s = job.tokens_per_step / median
    peak = peak_flops(resolve_device(job.device))
    fpt = flops_per_token(cfg, job.seq)
    print("RESULT " + json.dumps({
        **out, "median_step_s": median, "tokens_per_s": tokens_per_s, "steps": len(times),
        "mfu": tokens_per_s * fpt / peak if peak else None, "flops_per_token": fpt,
    }), flush=True)


# --------------------------------------------------------------------------- parent side



def skip_reason(backend: str, variant: str, device: str) -> str | None:
    """Why a combination cannot run here (printed in the table), or None."""
    import importlib.util

    if backend == "zero" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed (pip install 'bigtrain[deepspeed]')"
    if "triton" in variant and device != "cpu" and importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if variant == "fp8" and importlib.util.find_spec("torchao") is None:
        return "torchao not installed (pip install 'bigtrain[fp8]')"
    return None


def run_job(job: Job, timeout: float) -> dict[str, Any]:
    # This checkout first; whatever PYTHONPATH already holds (e.g. carried packages) after it.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": path}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job.__dict__)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "no output")
    return {"error": "OOM" if "out of memory" in (proc.stderr or "").lower() else err[:160]}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--presets", default=",".join(GPU_PRESETS), help="comma list of preset@seq_len")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per step (0 = the preset's default)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps (>= 50 for committed GPU numbers)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile, autotune, allocator)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, 3 steps, fp32: proves the script runs")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.smoke:
        args.presets, args.device, args.precision = "smoke@64", "cpu", "fp32"
        args.steps, args.warmup, args.micro_batch = 3, 1, args.micro_batch or 4
        if args.variants == ",".join(VARIANTS):
            args.variants = "eager,triton"  # compile needs minutes of CPU codegen; fp8 emulation is a test's job
    presets = [p.split("@") for p in args.presets.split(",")]
    backends, variants = args.backends.split(","), args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for b in backends:
        if b not in BACKENDS:
            sys.exit(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")

    rows: list[tuple[str, str, str, dict[str, Any], Job]] = []
    for preset, seq in presets:
        micro = args.micro_batch or GPU_PRESETS.get(f"{preset}@{seq}", 4)
        base = {"preset": preset, "seq": int(seq), "micro_batch": micro, "steps": args.steps, "warmup": args.warmup,
                "device": args.device, "precision": args.precision}
        plain_variant = "eager" if args.smoke else "compile"
        plain_job = Job(backend="plain", variant=plain_variant, **base)
        print(f"[{preset}@{seq}] plain PyTorch ({plain_variant}) ...", flush=True)
        plain = run_job(plain_job, args.timeout)
        rows.append((f"{preset}@{seq}", "plain PyTorch", plain_variant, plain, plain_job))
        for backend in backends:
            for variant in variants:
                job = Job(backend=backend, variant=variant, **base)
                reason = skip_reason(backend, variant, args.device)
                if reason:
                    print(f"[{preset}@{seq}] {backend} {variant}: skipped ({reason})", flush=True)
                    rows.append((f"{preset}@{seq}", backend, variant, {"error": f"skipped: {reason}"}, job))
                    continue
                print(f"[{preset}@{seq}] {backend} {variant} ...", flush=True)
                res = run_job(job, args.timeout)
                res["ratio"] = (res["tokens_per_s"] / plain["tokens_per_s"]
                                if "tokens_per_s" in res and "tokens_per_s" in plain else None)
                rows.append((f"{preset}@{seq}", backend, variant, res, job))

    device = next((r[3]["device_name"] for r in rows if "device_name" in r[3]), args.device)
    commit = git_commit()
    import torch

    out = io.StringIO()
    out.write(f"# Training throughput{' (SMOKE: tiny CPU model, not a performance result)' if args.smoke else ''}\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {commit}  torch {torch.__version__}\n")
    out.write(f"- device: {device}; precision {args.precision}; world size 1; synthetic tokens; grad accum 1\n")
    out.write(f"- {args.warmup} warm-up steps, then median of {args.steps} timed steps (device sync after each)\n")
    out.write("- MFU = tokens/s x (6N + 12·L·H·Q·T) / peak dense bf16 (989 TFLOP/s on H100 SXM/H200), "
              "no recompute counted\n")
    out.write("- ratio = tokens/s / the plain PyTorch loop's tokens/s for the same preset\n\n")
    out.write("| preset@T | backend | variant | micro-batch | step ms | tokens/s | MFU | peak GiB | vs plain "
              "| kernels |\n")
    out.write("|---|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    for name, backend, variant, res, job in rows:
        if "error" in res:
            out.write(f"| {name} | {backend} | {variant} | {job.micro_batch} | — | — | — | — | — | {res['error']} |\n")
            continue
        mfu = f"{res['mfu'] * 100:.1f}%" if res.get("mfu") is not None else "n/a"
        out.write(f"| {name} | {backend} | {variant} | {job.micro_batch} | {res['median_step_s'] * 1000:.1f} | "
                  f"{res['tokens_per_s']:,.0f} | {mfu} | {res['peak_gib']:.2f} | {fmt(res.get('ratio'), '.3f')} | "
                  f"{res['kernels']} |\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
