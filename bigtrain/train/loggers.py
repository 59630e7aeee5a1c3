"""Where metrics go: the console (a line per log step plus a whole-run progress bar with ETA),
metrics.jsonl (always), RUN_DIR/status.json, Weights & Biases and TensorBoard (both optional).

Every logger takes the same records (``{"kind": "train" | "eval" | "checkpoint" | ..., "step": ...}``)
and only rank 0 builds any. wandb and tensorboard are imported inside their loggers, so
``import bigtrain`` stays light and a run without them never needs them installed.
"""
from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
import string
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from bigtrain.errors import UserError, missing_package
from bigtrain.train.status import read_status, write_status

if TYPE_CHECKING:
    from bigtrain.train.run_config import RunConfig


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    """The fields of a record a dashboard can plot (numbers, not bools or strings)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("kind", "time")}


# --------------------------------------------------------------------------- metrics.jsonl
class JsonlLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (flushed each line)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", buffering=1)  # noqa: SIM115 - open for the logger's lifetime; close() closes it

    def log(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------- console
def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def fmt_duration(seconds: float) -> str:
    """Compact human duration: 45s, 3m12s, 2h05m, 3d04h."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class ConsoleLogger:
    """One aligned line per training log step or evaluation, plus a whole-run progress bar.

    On a terminal the bar is redrawn in place below the log lines (at most every 0.2 s); in a file
    (SLURM logs, CI) no bar is drawn and each training line ends with the ETA instead, so logs
    stay free of carriage returns.
    """

    BAR_WIDTH = 24

    def __init__(self, max_steps: int, stream: Any = None, *, tty: bool | None = None) -> None:
        self.max_steps = max_steps
        self.width = len(str(max_steps))
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._t0: float | None = None  # ETA is measured from the first step this process ran
        self._step0 = 0
        self._last_draw = 0.0
        self._bar_shown = False

    # -- ETA / progress
    def eta_s(self, step: int) -> float | None:
        """Seconds left at this process's average pace (evaluations and checkpoints included)."""
        if self._t0 is None or step <= self._step0:
            return None
        return (time.perf_counter() - self._t0) / (step - self._step0) * max(0, self.max_steps - step)

    def start(self, step: int) -> None:
        """Start the ETA clock at ``step`` (the step a resumed run continues from)."""
        self._t0, self._step0 = time.perf_counter(), step

    def progress(self, step: int) -> None:
        """Called after every optimizer step (cheap: no device sync, throttled redraw)."""
        if self._t0 is None:
            self.start(step - 1)
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.2 and step < self.max_steps:
            return
        self._last_draw = now
        self._draw(step)

    def bar(self, step: int) -> str:
        frac = min(1.0, step / max(1, self.max_steps))
        filled = round(frac * self.BAR_WIDTH)
        eta = self.eta_s(step)
        elapsed = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return (f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {100 * frac:3.0f}% "
                f"{step:>{self.width}}/{self.max_steps} | elapsed {fmt_duration(elapsed)}"
                f" | eta {'?' if eta is None else fmt_duration(eta)}")

    def _draw(self, step: int) -> None:
        self.stream.write("\r\x1b[2K" + self.bar(step))
        self.stream.flush()
        self._bar_shown = True

    def wrap_echo(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` that first clears the bar, so other messages (checkpoints, samples) print cleanly."""
        def clear_then_echo(text: str) -> None:
            self._clear_bar()
            echo(text)

        return clear_then_echo

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[2K")
            self._bar_shown = False

    # -- lines
    def format(self, record: dict[str, Any]) -> str | None:
        step = f"step {record['step']:>{self.width}}/{self.max_steps}"
        if record.get("kind") == "eval":
            return (f"{step} | val_loss {record['val_loss']:.4f} | val_bpb {record['val_bpb']:.4f} | "
                    f"{record['eval_s']:.1f}s")
        if record.get("kind") != "train":
            return None
        mfu = record.get("mfu")
        line = (
            f"{step} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f}"
            f" | {_fmt_rate(record['tokens_per_s'])} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
            f" | {1000 * record['step_time_s']:.0f} ms/step | mem {record['memory_gib']:.2f} GiB"
        )
        if record.get("moe_imbalance_max") is not None:  # the worst MoE layer's max / mean tokens per expert
            line += f" | moe imb {record['moe_imbalance_max']:.2f}"
        # Health hints: only when a stall eats a noticeable share of the step.
        step_time = record.get("step_time_s") or 0.0
        for key, label in (("data_wait_s", "data wait"), ("checkpoint_stall_s", "ckpt stall")):
            share = (record.get(key) or 0.0) / step_time if step_time > 0 else 0.0
            if share >= 0.1:
                line += f" | {label} {100 * share:.0f}%"
        if not self.tty:
            eta = self.eta_s(int(record["step"]))
            if eta is not None and record["step"] < self.max_steps:
                line += f" | eta {fmt_duration(eta)}"
        return line

    def log(self, record: dict[str, Any]) -> None:
        line = self.format(record)
        if line is None:
            return
        self._clear_bar()
        print(line, file=self.stream, flush=True)
        if self.tty and self._t0 is not None and record.get("kind") == "train":
            self._draw(int(record["step"]))

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False


# --------------------------------------------------------------------------- status.json
class StatusLogger:
    """Keeps RUN_DIR/status.json current (step, tokens, last loss/val_bpb/checkpoint, wall time)."""

    def __init__(self, run_dir: Path, *, name: str, max_steps: int, resumed: bool) -> None:
        self.run_dir = run_dir
        previous = read_status(run_dir) if resumed else None
        # Wall time accumulates over the attempts of a resumed run.
        self.prior_wall_s = float((previous or {}).get("wall_time_s", 0.0) or 0.0)
        self.t0 = round(time.time(), 3)
        self.fields: dict[str, Any] = {"name": name, "max_steps": max_steps, "start_time": round(self.t0, 3)}
        if previous is None:
            # A fresh run in a reused folder must not inherit the last run's numbers.
            self.fields.update(step=0, tokens=0, loss=None, val_bpb=None, val_loss=None, last_checkpoint=None,
                               first_start_time=round(self.t0, 3))

    def _preempted(self) -> bool:
        """Whether the launch code wrote ``preempted`` from this process (after our start())."""
        current = read_status(self.run_dir) or {}
        return current.get("status") == "preempted" and current.get("pid") == os.getpid()

    def _write(self, status: str, *, fresh: bool = False, **extra: Any) -> None:
        if not fresh and self._preempted():
            status = "preempted"  # the launch code said so; later records must not turn it back to running
        write_status(self.run_dir, status, **self.fields, **extra,
                     wall_time_s=round(self.prior_wall_s + time.time() - self.t0, 3))

    def start(self, step: int, tokens: int) -> None:
        self.fields.update(step=step, tokens=tokens)
        self._write("running", fresh=True)  # a new attempt: an old "preempted" is history

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "train":
            self.fields.update(step=record["step"], tokens=record.get("tokens"), loss=record.get("loss"))
        elif kind == "eval":
            self.fields.update(val_bpb=record.get("val_bpb"), val_loss=record.get("val_loss"))
        elif kind == "checkpoint":
            path = record.get("path") or record.get("checkpoint")
            if path:
                self.fields["last_checkpoint"] = str(path)
        else:
            return
        self._write("running")

    def finish(self, status: str, **extra: Any) -> None:
        """Final status: ``finished`` or ``failed`` (a ``preempted`` already written is kept)."""
        self.fields.update(extra)
        self._write(status)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- Weights & Biases
_WANDB_HOST = "api.wandb.ai"


def _wandb_host() -> str:
    base = os.environ.get("WANDB_BASE_URL", "")
    return (urlparse(base).hostname if base else None) or _WANDB_HOST


def wandb_credentials_found() -> bool:
    """Whether W&B has an API key here, checked without wandb and without the network:
    WANDB_API_KEY, a netrc entry for the W&B host (NETRC, ~/.netrc, ~/_netrc) or an api_key in
    wandb's settings file (WANDB_CONFIG_DIR/settings or ~/.config/wandb/settings)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = _wandb_host()
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += ["~/.netrc", "~/_netrc"]
    for name in candidates:
        path = Path(name).expanduser()
        if not path.is_file():
            continue
        try:
            auth = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    try:
        settings = (config_dir / "settings").read_text()
    except OSError:
        return False
    return any(line.split("=", 1)[0].strip() == "api_key" and line.split("=", 1)[1].strip()
               for line in settings.splitlines() if "=" in line)


def resolve_wandb_mode(configured: str) -> str:
    """The W&B mode this run will use, checked up front (no import of wandb, no network).

    WANDB_MODE, when set, overrides ``log.wandb.mode`` (wandb's own convention: turn W&B off in CI,
    or go offline on nodes without internet, without editing configs). Raises UserError for an
    unusable combination so the run stops before any model is built.
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        env = "disabled"
    mode = {"": configured, "dryrun": "offline", "run": "online"}.get(env, env)
    if mode not in ("disabled", "offline", "online"):
        raise UserError(f"WANDB_MODE={env!r} is not a W&B mode; unset it or use online, offline or disabled.")
    if mode == "disabled":
        return mode
    source = f"WANDB_MODE={env}" if env else f"log.wandb.mode={mode}"
    if importlib.util.find_spec("wandb") is None:
        raise missing_package("wandb", source, "set log.wandb.mode=disabled",
                              ModuleNotFoundError("No module named 'wandb'"))
    if mode == "online" and not wandb_credentials_found():
        raise UserError(
            f"{source} but no W&B API key was found (WANDB_API_KEY is unset, no netrc entry for {_wandb_host()}, "
            f"no api_key in wandb's settings). Run `wandb login` or export WANDB_API_KEY, or log offline with "
            f"log.wandb.mode=offline and upload later with `wandb sync RUN_DIR/wandb/offline-run-*`."
        )
    return mode


WANDB_ID_FILE = "wandb_run_id"


class WandbLogger:
    """Logs records to a W&B run whose files live under RUN_DIR/wandb.

    The run id is stored in RUN_DIR/wandb_run_id, so a resumed training run continues the same
    W&B run. Every metric is plotted against ``step`` (not W&B's internal step), so a resume
    that rewinds to an earlier checkpoint logs its steps again instead of being dropped.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, mode: str, *, resumed: bool) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise missing_package("wandb", f"log.wandb.mode={mode}", "set log.wandb.mode=disabled", exc) from None

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        w = cfg.log.wandb
        try:
            self.run = wandb.init(
                project=w.project, entity=w.entity or None, name=w.name or cfg.run.name, tags=list(w.tags) or None,
                config=cfg.to_dict(), dir=str(run_dir), id=run_id, resume="allow",
                mode=mode,  # type: ignore[arg-type]  # one of log.wandb.mode's values, checked by its section
                # Our own console lines and progress bar stay as they are (no stdout wrapping).
                settings=wandb.Settings(console="off"),
            )
        except Exception as exc:  # wandb raises its own CommError/UsageError/...: all mean "cannot start"
            raise UserError(f"could not start the W&B run ({type(exc).__name__}: {exc}). Check the network, the "
                            f"API key and log.wandb.project/entity, or log offline with log.wandb.mode=offline "
                            f"(upload later with `wandb sync`).") from None
        id_file.write_text(run_id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "misc")
        values = {f"{kind}/{k}": v for k, v in _numeric(record).items() if k not in ("step",)}
        if values:
            self.run.log({"step": record.get("step", 0), **values})

    def close(self) -> None:
        self.run.finish()


# --------------------------------------------------------------------------- TensorBoard
class TensorBoardLogger:
    """Scalars under RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("log.tensorboard=true needs the tensorboard package: `pip install tensorboard`, "
                            "or set log.tensorboard=false.") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "```")

    def log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "misc"), int(record.get("step", 0))
        for key, value in _numeric(record).items():
            if key != "step":
                self.writer.add_scalar(f"{kind}/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def preflight(cfg: RunConfig) -> str:
    """Check the logging set-up before anything expensive happens; returns the W&B mode to use."""
    steps = cfg.log.profile.steps
    if steps and steps[0] > cfg.train.max_steps:
        raise UserError(f"log.profile.steps={list(steps)} starts after the last step (train.max_steps="
                        f"{cfg.train.max_steps}); pick steps within 1..{cfg.train.max_steps}.")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("log.tensorboard=true needs the tensorboard package: `pip install tensorboard`, "
                        "or set log.tensorboard=false.")
    return resolve_wandb_mode(cfg.log.wandb.mode)


def early_wandb_check(raw: Mapping[str, Any]) -> None:
    """The W&B credential check on the raw YAML mapping, before torch is even imported (~3 s), so
    ``online`` without a key fails in about a second. Values are validated properly later; a
    malformed ``log`` section is left to that validation."""
    if os.environ.get("RANK", "0") != "0":
        return
    log = raw.get("log")
    section = log.get("wandb") if isinstance(log, dict) else None
    mode = section.get("mode") if isinstance(section, dict) else None
    resolve_wandb_mode(mode if mode in ("disabled", "offline", "online") else "disabled")
