"""GPU readiness: one command that proves bigtrain's CUDA paths and measures throughput in under 8 minutes.

    python bench/gpu_check.py                 # on one H100/H200: correctness, then throughput (default budget)
    python bench/gpu_check.py --only flex,ddp # rerun only the checks whose names start with these
    python bench/gpu_check.py --smoke         # the same code paths at tiny sizes on CPU (Triton interpreted), <= 90 s

1. Correctness, one pass/fail row each with the measured error:
   * the four Triton kernels (RMSNorm, rotary, SwiGLU, linear + cross-entropy), compiled on the GPU,
     forward and every gradient vs float64 references on fresh random inputs (bf16 <= 2e-2, fp32 <= 1e-5,
     norm-wise relative error; TF32 off for the check);
   * FlexAttention with document masking vs SDPA with the explicit boolean mask (fp64 reference);
   * 30 steps of the debug model in bf16 autocast track fp32: every step's loss within 2% (the bound
     docs/performance.md documents);
   * FP8 (when torchao imports): 20 steps, finite, last loss below the first;
   * fused AdamW equals the foreach implementation (and is what bigtrain picks on CUDA);
   * `fsdp` and `ddp` at world size 1 (NCCL on CUDA) match `single` step by step;
   * no host-device sync on non-log steps (bigtrain's own calls, and CUDA's sync debug mode);
   * the step-time breakdown (CUDA events) sums to the measured step time within 5%;
   * async checkpoint of llama-1b (model + AdamW state): the step-loop stall vs the background commit;
   * the MoE layer's grouped expert matmuls (torch._grouped_mm) equal the per-expert loop in bf16, forward
     and every gradient (OLMoE's layer shape: dim 2048, 64 experts of SwiGLU 1024, top-8, 16k tokens).
2. Throughput (bench/throughput.py's measurement, one subprocess per configuration, synthetic tokens):
   gpt2-124m at T=1024 and llama-1b at T=2048 as eager, compile, compile + triton, compile + fp8 and the
   plain-PyTorch reference loop; gpt2-1.5b at T=1024 if the budget allows. Before them, the MoE layer's
   forward + backward tokens/s (grouped matmuls, and the per-expert loop) against a dense SwiGLU of equal
   active FLOPs (hidden top_k x expert hidden), in bf16, in this process. What does not fit in
   ``--budget-s`` (counted from the start, correctness included) is skipped and reported.
3. Results: ``--out`` (default bench/results/) gets gpu-check-<device>-<date>-<commit>.md (the table)
   and .log (every detail); a real GPU run also replaces the marked section of docs/performance.md.
   The table is printed last. Exit status 1 when a correctness check failed, 0 otherwise.

Data: the demo corpus (data/demo) when it is there, else a synthetic corpus built by bigtrain's own
`data prepare` path (the GPU image has no network). Needs torch, triton (on GPU), numpy, tokenizers,
pyyaml; deepspeed, datasets, wandb and torchao are optional.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:
    # Triton's CPU interpreter must be chosen before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _key, _value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from benchinfo import cpu_name, git_commit  # noqa: E402  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bigtrain from this checkout when it is not installed

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BF16_LOSS_BOUND = 0.02  # bf16 autocast vs fp32: each step's loss within 2% (docs/performance.md)
BACKEND_REL = 1e-4  # fsdp/ddp at world size 1 vs single, fp32
BREAKDOWN_REL = 0.05
DOCS_BEGIN, DOCS_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the real check on a GPU, tiny ones for --smoke on CPU."""

    rows: int  # RMSNorm / SwiGLU rows
    hidden: int
    batch: int  # rotary / attention
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    ce_tokens: int
    ce_vocab: int
    steps_bf16: int
    steps_fp8: int
    steps_backend: int
    steps_sync: int
    log_every_sync: int
    train_overrides: tuple[str, ...]
    checkpoint_preset: str
    throughput_presets: tuple[str, ...]
    optional_presets: tuple[str, ...]
    throughput_steps: int
    throughput_warmup: int
    # The MoE layer check: model dim, routed experts, top-k, expert hidden, tokens, timed and warm-up steps.
    moe_dim: int
    moe_experts: int
    moe_top_k: int
    moe_hidden: int
    moe_tokens: int
    moe_iters: int
    moe_warmup: int


GPU = Sizes(rows=4096, hidden=2048, batch=2, seq=1024, heads=16, kv_heads=4, head_dim=128, ce_tokens=4096,
            ce_vocab=32000, steps_bf16=30, steps_fp8=20, steps_backend=10, steps_sync=30, log_every_sync=10,
            train_overrides=(), checkpoint_preset="llama-1b",
            throughput_presets=("gpt2-124m@1024", "llama-1b@2048"), optional_presets=("gpt2-1.5b@1024",),
            throughput_steps=30, throughput_warmup=5,
            moe_dim=2048, moe_experts=64, moe_top_k=8, moe_hidden=1024, moe_tokens=16384, moe_iters=10,
            moe_warmup=2)
SMOKE = Sizes(rows=9, hidden=48, batch=2, seq=16, heads=4, kv_heads=2, head_dim=8, ce_tokens=24, ce_vocab=100,
              steps_bf16=4, steps_fp8=4, steps_backend=3, steps_sync=9, log_every_sync=3,
              # bf16 (and emulated FP8) backward is slow on CPU: a smaller model than the debug preset
              train_overrides=("model.dim=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                               "data.seq_len=64", "train.global_batch_tokens=512", "train.micro_batch_size=8",
                               "run.num_threads=2"),
              checkpoint_preset="debug", throughput_presets=("smoke@64",), optional_presets=(),
              throughput_steps=3, throughput_warmup=1,
              moe_dim=32, moe_experts=8, moe_top_k=2, moe_hidden=16, moe_tokens=64, moe_iters=1,
              moe_warmup=1)


@dataclass
class Row:
    """One line of the result table."""

    section: str  # "correctness" | "throughput"
    name: str
    status: str  # pass | FAIL | skip | info
    measured: str
    limit: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


class Log:
    """Everything the check does, in order, to the .log file (and progress lines to stdout)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    def __call__(self, text: str, *, echo: bool = True) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        self.lines.append(line)
        if echo:
            print(line, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# ---------------------------------------------------------------------------------------------- helpers
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf when actual is not finite)."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def leaf64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().requires_grad_(x.requires_grad)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off while comparing against fp32 tolerances (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=lambda k: errors[k])
    return name, errors[name]


def kernel_row(name: str, dtype: torch.dtype, errors: dict[str, float]) -> Row:
    which, err = worst(errors)
    limit = TOLERANCE[dtype]
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return Row("correctness", f"triton {name} {str(dtype).removeprefix('torch.')}", "pass" if err <= limit else "FAIL",
               f"max rel err {err:.2e} ({which})", f"<= {limit:.0e}", data={"errors": errors, "detail": detail})


# ---------------------------------------------------------------------------------------------- kernels
def check_kernels(device: torch.device, sizes: Sizes) -> list[Row]:
    """The four Triton kernels (compiled on CUDA; the interpreter on CPU), forward + backward vs float64."""
    from bigtrain.kernels import dispatch
    from bigtrain.kernels import reference as ref
    from bigtrain.model.decoder import rotary_tables

    if not dispatch.triton_runs_on(device):
        reason = dispatch.fallback_reason("triton", device) or "Triton does not run here"
        return [Row("correctness", "triton kernels", "FAIL" if device.type == "cuda" else "skip", reason)]
    from bigtrain.kernels import linear_cross_entropy, rmsnorm, rotary, swiglu

    rows = []
    gen = torch.Generator(device=device).manual_seed(int(time.time()))  # fresh inputs every run
    for dtype in (torch.float32, torch.bfloat16):
        def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> torch.Tensor:
            return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

        with exact_fp32():
            # RMSNorm
            x = randn(sizes.rows, sizes.hidden).requires_grad_()
            w = (1 + randn(sizes.hidden, scale=0.3)).requires_grad_()
            dy = randn(sizes.rows, sizes.hidden)
            y = rmsnorm.rms_norm(x, w, 1e-5)
            y.backward(dy)
            x64, w64 = leaf64(x), leaf64(w)
            y64 = ref.rms_norm(x64, w64, 1e-5)
            y64.backward(dy.double())
            rows.append(kernel_row("rmsnorm", dtype, {"out": rel_err(y, y64), "dx": rel_err(x.grad, x64.grad),
                                                      "dw": rel_err(w.grad, w64.grad)}))
            # Rotary on the attention layer's strided [B, H, S, D] views, with per-token positions
            b, s, d = sizes.batch, sizes.seq, sizes.head_dim
            q = randn(b, s, sizes.heads, d).transpose(1, 2).requires_grad_()
            k = randn(b, s, sizes.kv_heads, d).transpose(1, 2).requires_grad_()
            cos, sin = rotary_tables(d, 2 * s, 10000.0)
            cos, sin = cos.to(device), sin.to(device)
            pos = torch.randint(0, 2 * s, (b, s), generator=gen, device=device)
            qo, ko = rotary.rotary(q, k, cos, sin, pos)
            gq, gk = randn(*qo.shape), randn(*ko.shape)
            ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
            q64, k64 = leaf64(q), leaf64(k)
            qr, kr = ref.rotary(q64, k64, cos.double(), sin.double(), pos)
            ((qr * gq.double()).sum() + (kr * gk.double()).sum()).backward()
            rows.append(kernel_row("rotary", dtype, {"q": rel_err(qo, qr), "k": rel_err(ko, kr),
                                                     "dq": rel_err(q.grad, q64.grad), "dk": rel_err(k.grad, k64.grad)}))
            # SwiGLU
            g = randn(sizes.rows, sizes.hidden, scale=3.0).requires_grad_()
            u = randn(sizes.rows, sizes.hidden).requires_grad_()
            dy = randn(sizes.rows, sizes.hidden)
            y = swiglu.swiglu(g, u)
            y.backward(dy)
            g64, u64 = leaf64(g), leaf64(u)
            y64 = ref.swiglu_exact(g64, u64)
            y64.backward(dy.double())
            rows.append(kernel_row("swiglu", dtype, {"out": rel_err(y, y64), "dgate": rel_err(g.grad, g64.grad),
                                                     "dup": rel_err(u.grad, u64.grad)}))
            # Linear + cross-entropy (with z-loss and ignored targets)
            h = randn(sizes.ce_tokens, sizes.hidden).requires_grad_()
            wt = randn(sizes.ce_vocab, sizes.hidden, scale=sizes.hidden ** -0.5).requires_grad_()
            t = torch.randint(0, sizes.ce_vocab, (sizes.ce_tokens,), generator=gen, device=device)
            t[::7] = ref.IGNORE_INDEX
            loss = linear_cross_entropy.linear_cross_entropy(h, wt, t, z_loss=1e-4)
            loss.backward()
            h64, wt64 = leaf64(h), leaf64(wt)
            loss64 = ref.linear_cross_entropy(h64, wt64, t, z_loss=1e-4)
            loss64.backward()
            rows.append(kernel_row("linear+CE", dtype, {"loss": rel_err(loss, loss64), "dh": rel_err(h.grad, h64.grad),
                                                        "dw": rel_err(wt.grad, wt64.grad)}))
    compiled = "compiled" if device.type == "cuda" else "interpreted"
    for row in rows:
        row.data["mode"] = compiled
    return rows


def check_flex(device: torch.device, sizes: Sizes) -> list[Row]:
    """FlexAttention (block mask, compiled on CUDA) vs SDPA with the explicit mask, both vs an fp64 reference."""
    import torch.nn.functional as F

    from bigtrain.kernels.attention import document_mask, flex_available, flex_document_attention

    if device.type == "cuda" and not flex_available(device):
        return [Row("correctness", "flex attention (document mask)", "FAIL", "torch has no FlexAttention")]
    gen = torch.Generator(device=device).manual_seed(int(time.time()) + 1)
    b, h, s, d = sizes.batch, sizes.heads, sizes.seq, sizes.head_dim
    dtype = torch.bfloat16
    # torch's eager FlexAttention (the CPU smoke path) has no backward: gradients are checked on CUDA.
    grads = device.type == "cuda"
    q, k, v = (torch.randn(b, h, s, d, generator=gen, device=device).to(dtype).requires_grad_(grads) for _ in range(3))
    # Documents of random lengths packed into each row.
    cuts = torch.rand(b, s, generator=gen, device=device) < 8.0 / s
    cuts[:, 0] = False
    doc_ids = cuts.long().cumsum(dim=1)
    dy = torch.randn(b, h, s, d, generator=gen, device=device).to(dtype)
    out = flex_document_attention(q, k, v, doc_ids, compiled=grads)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    out64 = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=document_mask(doc_ids))
    errors = {"out": rel_err(out, out64)}
    if grads:
        out.backward(dy)
        out64.backward(dy.double())
        errors |= {"dq": rel_err(q.grad, q64.grad), "dk": rel_err(k.grad, k64.grad), "dv": rel_err(v.grad, v64.grad)}
    which, err = worst(errors)
    mode = "compiled, forward + backward" if grads else "eager, forward only (smoke)"
    docs = int(doc_ids[:, -1].float().mean().item()) + 1
    return [Row("correctness", f"flex attention bf16 ({mode}), {docs} docs/row",
                "pass" if err <= TOLERANCE[dtype] else "FAIL", f"max rel err {err:.2e} ({which}) vs SDPA+mask fp64",
                f"<= {TOLERANCE[dtype]:.0e}", data={"errors": errors, "mode": mode})]


def check_fused_adamw(device: torch.device) -> list[Row]:
    """torch's fused AdamW equals its foreach AdamW on the same parameters and gradients.

    bigtrain picks fused on CUDA.
    """
    from bigtrain.optim.optimizer import adamw_kwargs

    gen = torch.Generator(device=device).manual_seed(3)
    shapes = [(512, 256), (256,), (1000, 64)]
    params = {mode: [torch.randn(s, generator=torch.Generator(device=device).manual_seed(i), device=device)
                     .requires_grad_() for i, s in enumerate(shapes)] for mode in ("fused", "foreach")}
    opts = {mode: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **{mode: True})
            for mode, ps in params.items()}
    for _ in range(5):
        grads = [torch.randn(s, generator=gen, device=device) for s in shapes]
        for mode, ps in params.items():
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opts[mode].step()
    err = max(rel_err(a, b) for a, b in zip(params["fused"], params["foreach"], strict=True))
    picked = adamw_kwargs(params["fused"], device_type=device.type)
    ok = err <= 1e-6 and (device.type != "cuda" or picked.get("fused") is True)
    return [Row("correctness", "fused AdamW vs foreach (5 steps)", "pass" if ok else "FAIL",
                f"max rel diff {err:.1e}; bigtrain uses {picked}", "<= 1e-06")]


# ---------------------------------------------------------------------------------------------- training runs
def synthetic_corpus(root: Path, log: Log) -> Path:
    """A small deterministic corpus tokenized by bigtrain's `data prepare` path (no network needed)."""
    from bigtrain import messages
    from bigtrain.data.prepare import prepare_corpus

    out = root / "corpus"
    if (out / "manifest.json").is_file():
        return out
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "po", "di", "va", "er", "on", "th", "st", "an"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf: something to learn quickly
    texts = root / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    for doc in range(120):
        body = " ".join(rng.choices(words, weights, k=1500))
        (texts / f"doc{doc:03d}.txt").write_text(body.capitalize() + ".\n")
    log("data: building a synthetic corpus (data/demo is absent)")
    with messages.capture():
        prepare_corpus([str(texts)], out, vocab_size=1024, val_fraction=0.05, num_workers=1)
    return out


def data_overrides(args: argparse.Namespace, work: Path, log: Log) -> list[str]:
    demo = REPO / "data" / "demo"
    root = demo if (demo / "manifest.json").is_file() and not args.synthetic_data else synthetic_corpus(work, log)
    return [f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}",
            f"data.tokenizer={root / 'tokenizer.json'}"]


class Runs:
    """Trains the debug model in this process with a few overrides; returns the train records."""

    def __init__(self, device: torch.device, sizes: Sizes, data: list[str], work: Path) -> None:
        self.device, self.sizes, self.data, self.work = device, sizes, data, work
        self.count = 0

    def overrides(self, steps: int, *extra: str) -> list[str]:
        self.count += 1
        return [f"run.out_dir={self.work / f'run{self.count}'}", f"run.device={self.device.type}", *self.data,
                f"train.max_steps={steps}", "train.lr_warmup_steps=2", "eval.every_steps=0", "eval.at_end=false",
                "checkpoint.at_end=false", "log.sample_at_end=false", "log.console=false", "log.every_steps=1",
                *self.sizes.train_overrides, *extra]

    def trainer(self, steps: int, *extra: str) -> Any:
        from bigtrain.config import load_config
        from bigtrain.train.trainer import Trainer

        return Trainer(load_config(REPO / "configs" / "debug.yaml", self.overrides(steps, *extra)))

    def train(self, steps: int, *extra: str) -> list[dict[str, Any]]:
        from bigtrain import messages

        trainer = None
        try:
            with messages.capture():
                trainer = self.trainer(steps, *extra)
                trainer.fit()
            return records(trainer.run_dir)
        finally:
            finish(trainer)


def finish(trainer: Any) -> None:
    from bigtrain.parallel import dist

    if trainer is not None:
        trainer.loader.close()
    dist.destroy_process_group()  # the next run may use another strategy


def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def check_precision_and_backends(runs: Runs) -> list[Row]:
    """bf16 tracks fp32; fsdp and ddp (world size 1, NCCL on CUDA) match single in fp32."""
    s = runs.sizes
    rows = []
    fp32 = runs.train(s.steps_bf16, "train.precision=fp32")
    bf16 = runs.train(s.steps_bf16, "train.precision=bf16")
    diffs = [abs(b["loss"] - f["loss"]) / f["loss"] for b, f in zip(bf16, fp32, strict=True)]
    at = max(range(len(diffs)), key=diffs.__getitem__)
    rows.append(Row("correctness", f"bf16 autocast vs fp32, {s.steps_bf16} steps",
                    "pass" if max(diffs) <= BF16_LOSS_BOUND else "FAIL",
                    f"max loss diff {max(diffs):.2%} (step {fp32[at]['step']}); final {bf16[-1]['loss']:.4f} vs "
                    f"{fp32[-1]['loss']:.4f}", f"<= {BF16_LOSS_BOUND:.0%}"))
    backend = "NCCL" if runs.device.type == "cuda" else "gloo"
    # The reference has the same length (max_steps shapes the LR schedule).
    single = runs.train(s.steps_backend, "train.precision=fp32")
    for strategy in ("fsdp", "ddp"):
        got = runs.train(s.steps_backend, "train.precision=fp32", f"parallel.strategy={strategy}")
        # Not strict: a run that stopped early fails the length check below instead of raising here.
        errs = [max(abs(g[k] - w[k]) / abs(w[k]) for k in ("loss", "grad_norm"))
                for g, w in zip(got, single, strict=False)]
        ok = len(got) == s.steps_backend and max(errs) <= BACKEND_REL
        rows.append(Row("correctness", f"{strategy} world size 1 ({backend}) vs single, {s.steps_backend} steps",
                        "pass" if ok else "FAIL", f"max rel diff {max(errs):.1e} (loss, grad norm)",
                        f"<= {BACKEND_REL:.0e}"))
    return rows


def check_fp8(runs: Runs) -> list[Row]:
    import importlib.util

    s = runs.sizes
    if importlib.util.find_spec("torchao") is None:
        return [Row("correctness", "fp8 training", "skip", "torchao is not importable (carry its wheel to test FP8)")]
    got = runs.train(s.steps_fp8, "model.fp8=true", "train.precision=bf16")
    losses = [r["loss"] for r in got]
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    mode = "" if runs.device.type == "cuda" else " (emulated on CPU)"
    return [Row("correctness", f"fp8 training, {s.steps_fp8} steps{mode}", "pass" if ok else "FAIL",
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", "finite, decreasing")]


def check_sync_and_breakdown(runs: Runs) -> list[Row]:
    """One run: which steps synchronized the host (log steps only), and phases vs the measured step time."""
    from bigtrain import messages

    s = runs.sizes
    bigtrain_dir = str(REPO / "bigtrain")
    current = {"step": 0}
    syncs: dict[int, int] = {}
    cuda_syncs: dict[int, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def recorder(name: str) -> Callable[..., Any]:
        original = originals[name]

        def call(self: torch.Tensor, *a: Any, **kw: Any) -> Any:
            # bigtrain's own reads of a device tensor (on CPU, every read: what would sync on a GPU)
            if bigtrain_dir in sys._getframe(1).f_code.co_filename and (self.device.type != "cpu"
                                                                          or runs.device.type == "cpu"):
                syncs[current["step"]] = syncs.get(current["step"], 0) + 1
            return original(self, *a, **kw)
        return call

    trainer = None
    try:
        with messages.capture():
            # bf16 as a GPU run trains; fp32 on CPU, where bf16 backward is slow
            precision = "bf16" if runs.device.type == "cuda" else "fp32"
            trainer = runs.trainer(s.steps_sync, f"log.every_steps={s.log_every_sync}", f"train.precision={precision}")
        step_fn = trainer.train_step

        def train_step() -> Any:
            current["step"] = trainer.step + 1
            if runs.device.type != "cuda":
                return step_fn()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = step_fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            hits = [w for w in caught if "synchroniz" in str(w.message)]
            if hits:
                cuda_syncs[current["step"]] = len(hits)
            return out

        trainer.train_step = train_step
        for name in originals:
            setattr(torch.Tensor, name, recorder(name))
        try:
            with messages.capture():
                trainer.fit()
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        recs = records(trainer.run_dir)
    finally:
        finish(trainer)
    log_steps = {r["step"] for r in recs}
    bad = sorted(set(syncs) - log_steps - {0})
    bad_cuda = sorted(set(cuda_syncs) - log_steps)
    # Sync debug mode watches every thread, the data loader's too: reported, and counted against the check.
    rows = [Row("correctness", f"no host sync on non-log steps ({s.steps_sync} steps, log every {s.log_every_sync})",
                "pass" if not bad and not bad_cuda and syncs else "FAIL",
                f"bigtrain syncs on non-log steps: {bad or 'none'}; CUDA sync-debug hits: "
                f"{({k: cuda_syncs[k] for k in bad_cuda} or 'none') if runs.device.type == 'cuda' else 'n/a on CPU'}",
                "none", data={"syncs": syncs, "cuda": cuda_syncs})]
    phases = ("data_wait_s", "fwd_bwd_s", "collectives_s", "optimizer_s", "checkpoint_stall_s")
    windows = [r for r in recs if r["step"] > 1]  # step 1's window holds the first step's set-up
    errs = [(r["step"], abs(sum(r.get(p, 0.0) for p in phases) - r["step_time_s"]) / r["step_time_s"]) for r in windows]
    step, err = max(errs, key=lambda e: e[1]) if errs else (0, math.inf)
    timer = "CUDA events" if runs.device.type == "cuda" else "perf_counter (CPU)"
    rows.append(Row("correctness", f"step-time breakdown ({timer}) sums to the step time",
                    "pass" if err <= BREAKDOWN_REL else "FAIL",
                    f"worst window {err:.1%} off (log step {step}); "
                    + ", ".join(f"{p} {windows[-1].get(p, 0) * 1e3:.1f}ms" for p in phases[:4] if p in windows[-1])
                    + f", step {windows[-1]['step_time_s'] * 1e3:.1f}ms" if windows else "no windows",
                    f"<= {BREAKDOWN_REL:.0%}"))
    return rows


def check_async_checkpoint(device: torch.device, sizes: Sizes, work: Path) -> list[Row]:
    """Async save of model + AdamW state: how long the step loop is blocked vs the background commit."""
    from checkpoint import build  # bench/checkpoint.py: model + AdamW with state after one step

    from bigtrain.checkpoint.config import CheckpointConfig
    from bigtrain.checkpoint.manager import CheckpointManager
    from bigtrain.checkpoint.rank_state import capture_rng

    cfg, strategy, model, optimizer = build(sizes.checkpoint_preset, device.type)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor))
    manager = CheckpointManager(work / "ckpt", CheckpointConfig(keep_last=1, async_save=True))
    rank_state = {"data": {"next_sample": 0}, "rng": capture_rng()}
    common = {"strategy": strategy, "model": model, "optimizer": optimizer, "rank_state": rank_state, "tokens_seen": 0,
              "config": cfg.to_dict(), "config_hash": "gpu-check"}
    stalls, commits = [], []
    try:
        for step in (1, 2):  # the first save allocates the host buffers; the second is the steady state
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            manager.save(step, blocking=False, **common)
            stalls.append(time.perf_counter() - t0)
            manager.wait()
            commits.append(time.perf_counter() - t0)
    finally:
        del model, optimizer
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratio = stalls[-1] / commits[-1]
    name = f"async checkpoint {sizes.checkpoint_preset} ({nbytes / 2**30:.1f} GiB): step-loop stall"
    return [Row("correctness", name,
                "pass" if ratio <= 0.2 else "FAIL",
                f"stall {stalls[-1]:.2f}s (first save {stalls[0]:.2f}s) vs commit {commits[-1]:.2f}s = {ratio:.2f}x",
                "<= 0.2x commit", data={"stalls": stalls, "commits": commits, "bytes": nbytes})]


# ---------------------------------------------------------------------------------------------- MoE layer
def check_moe(device: torch.device, sizes: Sizes) -> list[Row]:
    """The MoE layer in bf16: grouped expert matmuls equal the per-expert loop (forward and every gradient,
    same weights and inputs, so the same routing); then forward + backward tokens/s of the grouped layer,
    the loop and a dense SwiGLU of equal active FLOPs (hidden top_k x expert hidden)."""
    import statistics

    from torch import nn

    from bigtrain.model.config import ModelConfig
    from bigtrain.model.decoder import FeedForward
    from bigtrain.model.moe import MoE, grouped_mm_available
    from bigtrain.sections import parse_section

    dim, experts, k, hidden = sizes.moe_dim, sizes.moe_experts, sizes.moe_top_k, sizes.moe_hidden
    tokens = sizes.moe_tokens
    dtype = torch.bfloat16
    where = f"dim {dim}, {tokens} tokens, bf16"
    if not grouped_mm_available():
        return [Row("correctness", f"moe grouped vs loop ({where})", "FAIL" if device.type == "cuda" else "skip",
                    "torch._grouped_mm is missing from this torch")]
    gen = torch.Generator(device=device).manual_seed(int(time.time()) + 2)  # fresh inputs every run
    shape = {"dim": dim, "num_layers": 1, "num_heads": 1, "vocab_size": 128, "max_seq_len": 16}  # attention unused

    def build(**model: Any) -> nn.Module:
        cfg = parse_section(ModelConfig, {**shape, **model}, "model")
        with torch.device(device):
            layer = MoE(cfg) if cfg.moe is not None else FeedForward(cfg)
        with torch.no_grad():
            for p in layer.parameters():  # std 1/sqrt(fan-in): activations of order one, a fair bf16 comparison
                nn.init.normal_(p, std=p.shape[-1] ** -0.5, generator=gen)
        return layer.to(dtype)

    def moe(matmul: str) -> nn.Module:
        return build(moe={"num_experts": experts, "top_k": k, "expert_hidden_dim": hidden, "expert_matmul": matmul})

    x = torch.randn(tokens, dim, generator=gen, device=device).to(dtype)
    dy = torch.randn(tokens, dim, generator=gen, device=device).to(dtype)

    def step(layer: nn.Module, xi: torch.Tensor) -> torch.Tensor:
        layer.zero_grad(set_to_none=True)
        xi.grad = None
        y = layer(xi)
        outs, grads = [y], [dy]
        aux = getattr(layer, "aux_loss", None)
        if aux is not None and aux.requires_grad:  # the balancing loss reaches the router as in training
            outs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outs, grads)
        return y

    grouped, loop = moe("grouped"), moe("loop")
    loop.load_state_dict(grouped.state_dict())
    results = {}
    for name, layer in (("grouped", grouped), ("loop", loop)):
        xi = x.clone().requires_grad_()
        y = step(layer, xi)
        grads = {n.removeprefix("experts.").removesuffix(".weight"): p.grad for n, p in layer.named_parameters()}
        results[name] = {"out": y.detach(), "dx": xi.grad, **grads}
    errors = {n: rel_err(results["grouped"][n], results["loop"][n]) for n in results["loop"]}
    which, err = worst(errors)
    limit = TOLERANCE[dtype]
    rows = [Row("correctness", f"moe grouped vs loop ({experts} experts x {hidden}, top-{k}, {where})",
                "pass" if err <= limit else "FAIL", f"max rel diff {err:.2e} ({which}), forward + backward",
                f"<= {limit:.0e}", data={"errors": errors,
                                          "detail": ", ".join(f"{n} {v:.1e}" for n, v in errors.items())})]
    del results

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(layer: nn.Module) -> dict[str, float]:
        xi = x.clone().requires_grad_()
        for _ in range(sizes.moe_warmup):  # allocator, kernels, autotuning
            step(layer, xi)
        sync()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(sizes.moe_iters):
            t0 = time.perf_counter()
            step(layer, xi)
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else math.nan
        return {"step_s": statistics.median(times), "peak_gib": peak}

    flops = 6 * 3 * dim * k * hidden  # expert (or dense SwiGLU) matmul FLOPs per token, forward + backward
    dense = build(ffn_hidden_dim=k * hidden)
    layers = [(f"dense SwiGLU {k * hidden}", dense, "equal active FLOPs (baseline)"),
              (f"grouped {experts}x{hidden} top-{k}", grouped, "vs the dense SwiGLU"),
              (f"loop {experts}x{hidden} top-{k}", loop, "vs the dense SwiGLU")]
    dense_tps = None
    for label, layer, limit_text in layers:
        t0 = time.monotonic()
        res = measure(layer)
        tps = tokens / res["step_s"]
        dense_tps = dense_tps or tps
        peak = f", peak +{res['peak_gib']:.2f} GiB over weights + grads" if math.isfinite(res["peak_gib"]) else ""
        measured = (f"{tps:,.0f} tok/s, {tps * flops / 1e12:.3g} TFLOP/s, {res['step_s'] * 1e3:.2f} ms fwd+bwd{peak}"
                    + (f", {tps / dense_tps:.2f}x dense" if layer is not dense else ""))
        rows.append(Row("throughput", f"moe layer: {label} ({where})", "info", measured, limit_text,
                        time.monotonic() - t0, data={**res, "tokens_per_s": tps, "ratio": tps / dense_tps}))
    del grouped, loop, dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- throughput
THROUGHPUT_VARIANTS = ("eager", "compile", "compile+triton", "fp8")  # fp8 = compile + fp8 (throughput.VARIANTS)


def throughput_rows(args: argparse.Namespace, sizes: Sizes, device: torch.device, log: Log) -> list[Row]:
    """bench/throughput.py's measurement for each preset and variant, within the time budget."""
    import throughput as tp  # bench/throughput.py

    smoke = device.type == "cpu"
    rows: list[Row] = []
    estimate = {"compile": 90.0, "plain": 90.0, "eager": 40.0}  # first guesses (s); then the last measured
    presets = list(sizes.throughput_presets) + list(sizes.optional_presets)
    for preset_seq in presets:
        preset, seq = preset_seq.split("@")
        optional = preset_seq in sizes.optional_presets
        micro = tp.GPU_PRESETS.get(preset_seq, 4)
        base = {"preset": preset, "seq": int(seq), "micro_batch": micro, "steps": sizes.throughput_steps,
                "warmup": sizes.throughput_warmup, "device": device.type, "precision": "fp32" if smoke else "bf16"}
        plain_variant = "eager" if smoke else "compile"
        jobs = [("plain", plain_variant)] + [(b, v) for b in ("single",) for v in
                                            (("compile+triton",) if optional else THROUGHPUT_VARIANTS)]
        plain_tps = None
        for backend, variant in jobs:
            label = "plain PyTorch" if backend == "plain" else f"bigtrain {variant}"
            if smoke and ("compile" in variant or variant == "fp8"):
                rows.append(Row("throughput", f"{preset_seq} {label}", "skip",
                                "smoke: inductor's CPU code generation takes minutes (compile is tested in the suite)"))
                continue
            reason = None if backend == "plain" else tp.skip_reason(backend, variant, device.type)
            kind = ("compile" if "compile" in variant or variant == "fp8"
                    else "plain" if backend == "plain" else "eager")
            left = args.budget_s - log.elapsed
            if reason is None and left < estimate[kind]:
                reason = f"budget: {left:.0f}s left < ~{estimate[kind]:.0f}s needed (--budget-s {args.budget_s:.0f})"
            if reason:
                rows.append(Row("throughput", f"{preset_seq} {label}", "skip", reason))
                log(f"throughput {preset_seq} {label}: skipped ({reason})")
                continue
            job = tp.Job(backend=backend, variant=variant, **base)
            log(f"throughput {preset_seq} {label} (micro-batch {micro}) ...")
            t0 = time.monotonic()
            res = tp.run_job(job, timeout=max(30.0, min(args.budget_s - log.elapsed + 60, 900)))
            wall = time.monotonic() - t0
            estimate[kind] = wall
            if "error" in res:
                rows.append(Row("throughput", f"{preset_seq} {label}", "FAIL", res["error"], seconds=wall))
                log(f"  error: {res['error']}")
                continue
            if backend == "plain":
                plain_tps = res["tokens_per_s"]
            ratio = res["tokens_per_s"] / plain_tps if plain_tps else None
            mfu = f"{res['mfu']:.1%}" if res.get("mfu") is not None else "n/a"
            vs_plain = f", {ratio:.2f}x plain" if ratio and backend != "plain" else ""
            measured = (f"{res['tokens_per_s']:,.0f} tok/s, MFU {mfu}, step {res['median_step_s'] * 1e3:.1f} ms, "
                        f"peak {res['peak_gib']:.1f} GiB{vs_plain}")
            rows.append(Row("throughput", f"{preset_seq} {label}", "info", measured,
                            ANCHORS.get(preset_seq, ""), wall, data={**res, "ratio": ratio, "micro_batch": micro}))
            log(f"  {measured} ({wall:.0f}s)")
    return rows


# H100 bf16 anchors from the issue (tokens/s, MFU): the throughput rows' reference column.
ANCHORS = {"gpt2-124m@1024": "llm.c H100: 468K tok/s (40.7%)", "llama-1b@2048": "~1B H100: 45.5K tok/s (41.8%)",
           "gpt2-1.5b@1024": "H100: 46.8K tok/s (48.7%)"}


# ---------------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def render(rows: list[Row], *, device: str, commit: str, smoke: bool, elapsed: float) -> str:
    out = io.StringIO()
    title = "GPU check" + (" (SMOKE: tiny sizes on CPU, Triton interpreted; not a GPU result)" if smoke else "")
    out.write(f"# {title}\n\n- date: {dt.date.today()}  commit: {commit}  torch {torch.__version__}"
              f"{'  triton ' + _triton_version() if _triton_version() else ''}\n- device: {device}\n"
              f"- wall time: {elapsed:.0f}s\n\n")
    out.write("| check | result | measured | limit / anchor | s |\n|---|---|---|---|---:|\n")
    for r in rows:
        out.write(f"| {r.name} | {r.status} | {r.measured} | {r.limit} | {r.seconds:.0f} |\n")
    failed = [r.name for r in rows if r.status == "FAIL" and r.section == "correctness"]
    out.write(f"\ncorrectness: {sum(r.status == 'pass' for r in rows)} passed, {len(failed)} failed, "
              f"{sum(r.status == 'skip' and r.section == 'correctness' for r in rows)} skipped"
              + (f" (failed: {', '.join(failed)})" if failed else "") + "\n")
    return out.getvalue()


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return ""


def update_docs(docs: Path, table: str) -> bool:
    """Replace the text between the gpu-check markers of ``docs`` with ``table``."""
    if not docs.is_file():
        return False
    text = docs.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        return False
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    body = table.split("\n", 1)[1]  # the section heading in docs stays docs'
    docs.write_text(f"{head}{DOCS_BEGIN}\n{body.strip()}\n{DOCS_END}{tail}")
    return True


# ---------------------------------------------------------------------------------------------- main
CHECKS: dict[str, str] = {  # --only prefixes -> what they select
    "kernels": "the four Triton kernels", "flex": "FlexAttention document masking", "adamw": "fused AdamW",
    "precision": "bf16 vs fp32 and fsdp/ddp at world size 1", "fp8": "FP8 training",
    "sync": "host syncs and the step-time breakdown", "checkpoint": "async checkpoint stall",
    "moe": "the MoE layer: grouped vs loop matmuls, tokens/s vs a dense SwiGLU", "throughput": "throughput",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the .md table and the .log")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget from the start; throughput runs that would not fit are skipped "
                         "(default 420)")
    ap.add_argument("--only", default="", help=f"comma list of checks to run: {', '.join(CHECKS)} (default: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on CPU, Triton interpreted: proves the script runs")
    ap.add_argument("--docs", default=str(REPO / "docs" / "performance.md"),
                    help="markdown file whose gpu-check section gets the table (GPU runs only; '' = none)")
    ap.add_argument("--commit", default="", help="the commit measured (default: git's HEAD here)")
    ap.add_argument("--synthetic-data", action="store_true", help="use the synthetic corpus even if data/demo exists")
    args = ap.parse_args(argv)
    only = [o for o in args.only.split(",") if o]
    unknown = [o for o in only if o not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    args.only = only or list(CHECKS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = Log()
    if args.smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", 0), GPU
    else:
        print("gpu_check: no CUDA device is visible; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    name = device_name(device)
    commit = args.commit or git_commit()
    log(f"gpu_check on {name}, torch {torch.__version__}, commit {commit}; checks: {', '.join(args.only)}")
    work = Path(tempfile.mkdtemp(prefix="bigtrain-gpu-check-"))
    rows: list[Row] = []

    def run(check: str, title: str, fn: Callable[[], list[Row]]) -> None:
        if check not in args.only:
            return
        log(f"{title} ...")
        t0 = time.monotonic()
        try:
            got = fn()
        except Exception as exc:  # one broken check must not hide the others' results
            log("".join(traceback.format_exception(exc)), echo=False)
            got = [Row("throughput" if check == "throughput" else "correctness", title, "FAIL",
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")]
        for r in got:
            r.seconds = r.seconds or (time.monotonic() - t0) / len(got)
            log(f"  {r.status:4} {r.name}: {r.measured}" + (f" ({r.data['detail']})" if "detail" in r.data else ""))
        rows.extend(got)
        write_results(partial=True)  # a run killed by its time limit still leaves what it measured

    out = Path(args.out)
    stem = f"gpu-check-{'smoke-' if args.smoke else ''}{slug(name)}-{dt.date.today()}-{commit}"

    def write_results(*, partial: bool) -> str:
        table = render(rows, device=name, commit=commit, smoke=args.smoke, elapsed=log.elapsed)
        if partial:
            table = table.replace("\n\n", "\n\n(partial: the check is still running)\n\n", 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(table)
        (out / f"{stem}.log").write_text("\n".join(log.lines) + "\n\n" + json.dumps(
            [r.__dict__ for r in rows], indent=1, default=str) + "\n")
        return table

    try:
        torch.manual_seed(0)
        data: list[str] = []
        if {"precision", "fp8", "sync"} & set(args.only):
            data = data_overrides(args, work, log)
        runs = Runs(device, sizes, data, work)
        run("kernels", "triton kernels vs float64", lambda: check_kernels(device, sizes))
        run("flex", "flex attention vs SDPA + mask", lambda: check_flex(device, sizes))
        run("adamw", "fused AdamW", lambda: check_fused_adamw(device))
        run("precision", "bf16 vs fp32; fsdp/ddp world size 1", lambda: check_precision_and_backends(runs))
        run("fp8", "fp8 training", lambda: check_fp8(runs))
        run("sync", "host syncs and step-time breakdown", lambda: check_sync_and_breakdown(runs))
        run("checkpoint", "async checkpoint", lambda: check_async_checkpoint(device, sizes, work))
        run("moe", "MoE layer: grouped vs loop, throughput vs dense", lambda: check_moe(device, sizes))
        run("throughput", "throughput", lambda: throughput_rows(args, sizes, device, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = write_results(partial=False)
    if not args.smoke and args.docs and update_docs(Path(args.docs), table):
        log(f"updated {args.docs}")
    log(f"results: {out / stem}.md and .log")
    print("\n" + table, flush=True)
    return 1 if any(r.status == "FAIL" and r.section == "correctness" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
