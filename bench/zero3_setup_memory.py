"""Host memory while ZeRO sets up a model bigger than one rank should hold: ZeRO-3 (partitioned at
construction) against ZeRO-2 (which holds whole parameters by design) as the baseline, same run.

Each case starts 2 CPU ranks (gloo) that build a Trainer for a ~1.1 GiB fp32 model and report the
growth of their peak resident memory (VmHWM, reset at the start) while the strategy builds and initializes the
model (from ``Strategy.wrap`` until it asks for the optimizer), relative to the whole fp32 model.
Target: ZeRO-3 <= 0.65x (before: the whole model on every rank, >= 1x). The growth over the whole
of ``wrap`` (DeepSpeed's flat partitions, fp32 master and AdamW moments included) is listed too:
that is training state, 16 bytes per parameter over the ranks, not set-up.

    DS_ACCELERATOR=cpu python bench/zero3_setup_memory.py [--out bench/results/zero3-setup-memory-cpu-2core.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import tempfile
from pathlib import Path

from benchinfo import REPO, cpu_name, git_commit, publish, torchrun_python  # bench/ is on sys.path when run as a script

# ~1.05 GiB of fp32 parameters: 24 blocks of dim 1024 (12.6M each) + a 4096 x 1024 embedding.
MODEL = ["model.dim=1024", "model.num_layers=24", "model.num_heads=8", "model.ffn_hidden_dim=2752",
         "model.vocab_size=4096", "data.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_size=2"]
CASES = {"zero-2 (whole parameters, baseline)": ["parallel.strategy=zero", "parallel.zero.stage=2"],
         "zero-3 (zero.Init)": ["parallel.strategy=zero", "parallel.zero.stage=3"]}


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to clear_refs); returns the RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _peak_bytes() -> int:
    return _status_bytes("VmHWM")


def rank_main(out_dir: str, overrides: list[str], result: str) -> None:
    """In one rank: build the Trainer with ``Strategy.wrap`` instrumented; write the set-up growth."""
    from bigtrain.config import load_config
    from bigtrain.model import count_parameters
    from bigtrain.parallel.zero import ZeroStrategy
    from bigtrain.train.trainer import Trainer

    measured: dict[str, int] = {}
    original = ZeroStrategy.wrap

    def wrap(self, model, make_optimizer, seed):  # type: ignore[no-untyped-def]
        before = _reset_peak()

        def optimizer_after_model(built):  # type: ignore[no-untyped-def]
            measured["model_setup"] = _peak_bytes() - before  # the model is built and initialized here
            return make_optimizer(built)

        try:
            return original(self, model, optimizer_after_model, seed)
        finally:
            measured["whole_wrap"] = _peak_bytes() - before

    ZeroStrategy.wrap = wrap  # type: ignore[method-assign]
    cfg = load_config("configs/debug.yaml", [f"run.out_dir={out_dir}", "log.console=false", "eval.at_end=false",
                                             "checkpoint.at_end=false", *overrides])
    Trainer(cfg)
    measured["model_bytes"] = 4 * count_parameters(cfg.model)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(result).write_text(json.dumps(measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, int]]] = []
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": f"{REPO / 'bench'}:{REPO}"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            result = Path(tmp) / "result.json"
            run_dir = str(Path(tmp) / f"run{len(rows)}")
            code = (f"from zero3_setup_memory import rank_main; "
                    f"rank_main({run_dir!r}, {MODEL + overrides!r}, {str(result)!r})")
            proc = torchrun_python(2, code, env)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows.append((name, json.loads(result.read_text())))
            print(f"{name}: model set-up grew peak RSS by {rows[-1][1]['model_setup'] / 2**30:.2f} GiB", flush=True)
    model = rows[0][1]["model_bytes"]
    base = rows[0][1]["model_setup"]
    out = io.StringIO()
    out.write("# ZeRO set-up memory: partitioned at construction (stage 3) vs whole parameters (stage 2)\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {git_commit()}\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), 2 ranks (gloo), fp32; model "
              f"{model / 2**30:.2f} GiB of fp32 parameters ({' '.join(MODEL[:5])})\n")
    out.write("- measured on rank 0: growth of peak resident memory (VmHWM over the RSS at the start) from "
              "Strategy.wrap until the model is built and initialized (model set-up), and over the whole of wrap "
              "(+ DeepSpeed's optimizer state)\n\n")
    out.write("| set-up | model set-up GiB | x full model | ratio vs zero-2 | whole wrap GiB |\n"
              "|---|---:|---:|---:|---:|\n")
    for name, r in rows:
        out.write(f"| {name} | {r['model_setup'] / 2**30:.2f} | {r['model_setup'] / model:.2f} | "
                  f"{r['model_setup'] / base:.2f} | {r['whole_wrap'] / 2**30:.2f} |\n")
    z3 = rows[-1][1]["model_setup"] / model
    out.write(f"\nzero-3 set-up = {z3:.2f}x the full model per rank ({'meets' if z3 <= 0.65 else 'MISSES'} the "
              f"<= 0.65x target)\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
