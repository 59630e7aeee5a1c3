"""Loggers, status.json, W&B preflight and the run-folder readers (no training here)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.config import load_config
from bigtrain.errors import UserError
from bigtrain.runs import read_metrics
from bigtrain.sections import ConfigError
from bigtrain.train import loggers
from bigtrain.train.loggers import (
    ConsoleLogger,
    JsonlLogger,
    StatusLogger,
    early_wandb_check,
    fmt_duration,
    preflight,
    resolve_wandb_mode,
    wandb_credentials_found,
)
from bigtrain.train.status import effective_status, read_status, write_status

TRAIN = {"kind": "train", "step": 10, "tokens": 20480, "loss": 3.5, "lr": 1e-3, "grad_norm": 0.5,
         "tokens_per_s": 4000.0, "mfu": None, "step_time_s": 0.5, "memory_gib": 1.0}


# --------------------------------------------------------------------------- console
def test_console_line_has_eta_and_stall_hints_without_a_tty() -> None:
    out = io.StringIO()
    console = ConsoleLogger(100, stream=out, tty=False)
    console.start(0)
    console._t0 -= 10.0  # pretend 10 s went by for 10 steps -> 90 steps left at 1 s/step
    console.log({**TRAIN, "data_wait_s": 0.2, "checkpoint_stall_s": 0.01})
    line = out.getvalue()
    assert line.startswith("step  10/100 | loss 3.5000") and line.endswith("\n")
    assert "| data wait 40%" in line and "ckpt stall" not in line  # 2% is below the 10% hint threshold
    assert "| eta 1m30s" in line or "| eta 1m29s" in line
    assert "\r" not in line  # files and SLURM logs get no carriage returns


def test_console_draws_a_progress_bar_on_a_tty() -> None:
    out = io.StringIO()
    console = ConsoleLogger(8, stream=out, tty=True)
    console.start(0)
    for step in range(1, 9):
        console.progress(step)
    console.log({**TRAIN, "step": 8})
    console.close()
    text = out.getvalue()
    assert "\r\x1b[2K[########################] 100%" in text and "8/8" in text and "eta" in text
    assert "| eta" not in text.split("step 8/8")[1].split("\n")[0]  # on a tty the ETA lives in the bar
    assert text.endswith("\n")


def test_console_ignores_records_it_does_not_know() -> None:
    out = io.StringIO()
    ConsoleLogger(10, stream=out, tty=False).log({"kind": "checkpoint", "step": 3, "path": "x"})
    assert out.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(5, "5s"), (192, "3m12s"), (7500, "2h05m"), (3 * 86400 + 4 * 3600, "3d04h")])
def test_fmt_duration(seconds: float, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_jsonl_logger_appends_with_time(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log(TRAIN)
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == 3.5 and record["time"] > 0


# --------------------------------------------------------------------------- status.json
def test_write_status_merges_and_is_atomic(tmp_path: Path) -> None:
    write_status(tmp_path, "running", step=1, start_time=100.0)
    write_status(tmp_path, "finished", step=5)
    status = read_status(tmp_path)
    assert status is not None
    assert status["status"] == "finished" and status["step"] == 5 and status["start_time"] == 100.0
    assert status["pid"] == os.getpid() and status["hostname"] and status["end_time"] >= status["updated_time"] - 1
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind
    with pytest.raises(ValueError):
        write_status(tmp_path, "done")
    (tmp_path / "status.json").write_text("{half")
    assert read_status(tmp_path) is None


def test_stale_running_status_shows_failed(tmp_path: Path) -> None:
    write_status(tmp_path, "running")
    assert effective_status(read_status(tmp_path)) == "running"  # this very process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = {**read_status(tmp_path), "pid": int(dead.stdout)}  # type: ignore[arg-type]
    assert effective_status(status) == "failed"
    assert effective_status({**status, "hostname": "another-node"}) == "running?"
    assert effective_status(None) == "unknown"


def test_status_logger_tracks_the_run_and_keeps_preempted(tmp_path: Path) -> None:
    status = StatusLogger(tmp_path, name="r", max_steps=10, resumed=False)
    status.start(0, 0)
    status.log(TRAIN)
    status.log({"kind": "eval", "step": 10, "val_bpb": 2.5, "val_loss": 4.0})
    status.log({"kind": "checkpoint", "step": 10, "path": str(tmp_path / "checkpoints" / "step_000010")})
    s = read_status(tmp_path)
    assert s is not None and s["status"] == "running" and s["step"] == 10 and s["loss"] == 3.5
    assert s["val_bpb"] == 2.5 and s["last_checkpoint"].endswith("step_000010") and s["max_steps"] == 10
    # The launch code marks a signal exit; a later record or the final write must not undo it.
    write_status(tmp_path, "preempted", step=10)
    status.log(TRAIN)
    status.finish("finished")
    assert read_status(tmp_path)["status"] == "preempted"  # type: ignore[index]
    # A resumed attempt accumulates wall time and is running again.
    before = read_status(tmp_path)["wall_time_s"]  # type: ignore[index]
    again = StatusLogger(tmp_path, name="r", max_steps=20, resumed=True)
    assert again.prior_wall_s == before > 0
    again.start(10, 20480)
    s2 = read_status(tmp_path)
    assert s2 is not None and s2["status"] == "running" and "end_time" not in s2 and s2["val_bpb"] == 2.5
    assert s2["wall_time_s"] >= before  # the first attempt's time is kept, not restarted from zero


# --------------------------------------------------------------------------- W&B preflight
@pytest.fixture
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return tmp_path


def test_wandb_credentials_sources(no_wandb_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = no_wandb_credentials
    assert not wandb_credentials_found()
    (home / ".netrc").write_text("machine example.com login u password p\n")
    assert not wandb_credentials_found()  # an entry for another host does not count
    (home / ".netrc").write_text("machine api.wandb.ai login user password abc123\n")
    assert wandb_credentials_found()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not wandb_credentials_found()  # self-hosted: the entry must be for that host
    (home / ".netrc").unlink()
    (home / "wandb-config").mkdir()
    (home / "wandb-config" / "settings").write_text("[default]\napi_key = xyz\n")
    assert wandb_credentials_found()
    (home / "wandb-config" / "settings").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials_found()


def test_wandb_mode_resolution(no_wandb_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(UserError, match=r"wandb login.*WANDB_API_KEY.*log\.wandb\.mode=offline"):
        resolve_wandb_mode("online")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment overrides the config
    assert resolve_wandb_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("disabled") == "offline"
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(UserError, match="WANDB_MODE='onlin' is not a W&B mode"):
        resolve_wandb_mode("disabled")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert resolve_wandb_mode("online") == "disabled"


def test_early_check_reads_the_raw_yaml(no_wandb_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"log\.wandb\.mode=online"):
        early_wandb_check({"log": {"wandb": {"mode": "online"}}})
    early_wandb_check({"log": {"wandb": "oops"}})  # malformed: left to config validation
    early_wandb_check({})
    monkeypatch.setenv("RANK", "1")  # only rank 0 logs to W&B, so only rank 0 checks
    early_wandb_check({"log": {"wandb": {"mode": "online"}}})


def test_missing_packages_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the `wandb` package"):
        resolve_wandb_mode("offline")
    with pytest.raises(UserError, match=r"log\.tensorboard=true needs the tensorboard package"):
        preflight(load_config(None, ["log.tensorboard=true"]))


def test_log_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"log.profile.steps: expected \[first, last\]"):
        load_config(None, ["log.profile.steps=[5]"])
    with pytest.raises(ConfigError, match=r"log\.profile\.steps"):
        load_config(None, ["log.profile.steps=[0,2]"])
    with pytest.raises(ConfigError, match=r"log\.wandb\.mode.*Did you mean 'offline'"):
        load_config(None, ["log.wandb.mode=ofline"])
    with pytest.raises(ConfigError, match=r"log\.wandb\.project"):
        load_config(None, ["log.wandb.project="])
    with pytest.raises(UserError, match=r"log.profile.steps=\[20, 30\] starts after the last step"):
        preflight(load_config(None, ["log.profile.steps=[20,30]", "train.max_steps=10"]))
    cfg = load_config(None, ["log.wandb.tags=[a,b]", "log.profile.steps=[3,4]"])
    assert cfg.log.wandb.tags == ["a", "b"] and cfg.log.profile.steps == [3, 4]


# --------------------------------------------------------------------------- run-folder reading
def test_read_metrics_drops_history_superseded_by_a_resume(tmp_path: Path) -> None:
    lines = [{"kind": "train", "step": s, "loss": float(s)} for s in (1, 2, 4, 6)]
    lines += [{"kind": "eval", "step": 3, "val_bpb": 3.0}, {"kind": "eval", "step": 6, "val_bpb": 2.0}]
    # Resumed from the step-3 checkpoint: steps 4 and 6 are logged again with new values.
    lines += [{"kind": "train", "step": 4, "loss": 40.0}, {"kind": "train", "step": 6, "loss": 60.0},
              {"kind": "eval", "step": 6, "val_bpb": 1.5}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "train", "st'  # killed mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    records = read_metrics(tmp_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert train == [(1, 1.0), (2, 2.0), (4, 40.0), (6, 60.0)]
    assert [(r["step"], r["val_bpb"]) for r in records if r["kind"] == "eval"] == [(3, 3.0), (6, 1.5)]


def test_configuration_reference_lists_nested_log_keys() -> None:
    from bigtrain.config import reference_markdown

    text = reference_markdown()
    keys = ("log.wandb.mode", "log.wandb.tags", "log.profile.steps", "log.tensorboard", "parallel.fsdp.cpu_offload")
    for key in keys:
        assert f"| `{key}` |" in text, key


def test_wandb_init_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def refuse(**kwargs):  # type: ignore[no-untyped-def]
        raise wandb.errors.CommError("host unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(UserError, match=r"could not start the W&B run.*host unreachable.*log\.wandb\.mode=offline"):
        loggers.WandbLogger(tmp_path, load_config(None), "online", resumed=False)
    assert not (tmp_path / loggers.WANDB_ID_FILE).exists()
