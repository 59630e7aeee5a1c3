"""`bigtrain plot RUN_DIR [RUN_DIR ...] -o out.png`: one figure to compare runs at a glance.

Eight panels from each run's metrics.jsonl: training loss vs step and vs tokens, validation
bits-per-byte vs step and vs tokens, learning rate, throughput, gradient norm and step time with
its data-wait share. Runs are overlaid in one color each, with one legend. matplotlib is imported
here only, with the Agg backend (no display needed).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError, missing_package
from bigtrain.runs import read_metrics, summarize_run

# (title, record kind, x key, y key, y label, log-scale y)
PANELS: list[tuple[str, str, str, str, str, bool]] = [
    ("training loss", "train", "step", "loss", "loss (nats/token)", False),
    ("training loss vs tokens", "train", "tokens", "loss", "loss (nats/token)", False),
    ("validation", "eval", "step", "val_bpb", "bits per byte", False),
    ("validation vs tokens", "eval", "tokens", "val_bpb", "bits per byte", False),
    ("learning rate", "train", "step", "lr", "lr", False),
    ("throughput", "train", "step", "tokens_per_s", "tokens/s (all ranks)", False),
    ("gradient norm (before clipping)", "train", "step", "grad_norm", "grad norm", True),
    ("step time (dashed: data wait)", "train", "step", "step_time_s", "ms/step", False),
]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _series(records: list[dict[str, Any]], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in records
              if r.get("kind") == kind and isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _labels(run_dirs: list[Path]) -> list[str]:
    """run.name when the names tell the runs apart, else the folder paths as given."""
    names = [summarize_run(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, smooth: float = 0.8) -> Path:
    """Draw the comparison figure for ``run_dirs`` into ``out`` (format from its suffix)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise missing_package("matplotlib", "bigtrain plot", "read metrics.jsonl with your own tools", exc) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    dirs = [Path(d) for d in run_dirs]
    runs: list[list[dict[str, Any]]] = []
    for d in dirs:
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{str(d)!r} has no metrics.jsonl; pass run folders (run.out_dir), e.g. "
                            f"`bigtrain plot runs/debug runs/try2 -o compare.png` (`bigtrain runs` lists them).")
        records = read_metrics(d)
        if not any(r.get("kind") == "train" for r in records):
            raise UserError(f"{str(d)!r} has no training records in metrics.jsonl yet (its first log step has not "
                            f"been reached); plot it later or leave it out.")
        runs.append(records)
    out = Path(out)
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if out.suffix.lstrip(".").lower() not in supported:
        raise UserError(f"-o {str(out)!r}: unknown image format {out.suffix or '(none)'!r}; use one of "
                        f".{', .'.join(sorted(supported))} (e.g. -o compare.png).")
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth must be within [0, 1), got {smooth}.")

    labels = _labels(dirs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 4, figsize=(22, 9.5), constrained_layout=True)
    for ax, (title, kind, x, y, ylabel, logy) in zip(axes.flat, PANELS, strict=True):  # 2 x 4 axes, 8 panels
        drawn = False
        for i, records in enumerate(runs):
            xs, ys = _series(records, kind, x, y)
            if not xs:
                continue
            drawn = True
            color = colors[i % len(colors)]
            if y == "step_time_s":
                ax.plot(xs, [1000 * v for v in ys], color=color, lw=1.6)
                dx, dys = _series(records, kind, x, "data_wait_s")
                if dx:
                    ax.plot(dx, [1000 * v for v in dys], color=color, lw=1.2, ls="--")
            elif y in ("loss", "grad_norm") and len(ys) > 10 and smooth > 0:
                # Raw values faint, smoothed trend bold: noise visible, trend readable.
                ax.plot(xs, ys, color=color, lw=0.8, alpha=0.3)
                ax.plot(xs, ema(ys, smooth), color=color, lw=1.8)
            else:
                ax.plot(xs, ys, color=color, lw=1.6, marker="o" if len(xs) <= 30 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.5M, not 1500000
        if y == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        if y == "step_time_s" and drawn:
            ax.set_ylim(bottom=0)  # the data-wait share is read against zero
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if logy and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"no {kind} records with {y}", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], lw=2.5) for i in range(len(runs))]
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 6), fontsize="large", frameon=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write {str(out)!r} ({exc.strerror or exc}); choose another -o path.") from None
    finally:
        plt.close(fig)
    return out
