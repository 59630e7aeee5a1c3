"""The CLI end to end on the demo corpus: train, resume exactly, generate, export, config show, bad input.

The verbs run through ``bigtrain.cli.main`` in this process (tests/helpers.py ``cli``: the same path
from argument parsing to exit status, without an interpreter start-up per call); what needs a
process of its own (``python -m bigtrain``, import side effects, missing packages) runs in one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli, run_cli

# A short, cheap version of the demo run.
QUICK = ["train.max_steps=6", "train.global_batch_tokens=2048", "train.micro_batch_size=4",
         "train.lr_warmup_steps=2", "eval.every_steps=3", "eval.max_batches=2", "eval.final_max_batches=2",
         "log.every_steps=2", "log.sample_tokens=12", "run.num_threads=2"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "debug"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={out}", "checkpoint.every_steps=3",
               "checkpoint.keep_last=5", *QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_train_writes_run_folder(trained_run: tuple[Path, str]) -> None:
    out, stdout = trained_run
    assert (out / "config.yaml").is_file()
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["loss"] > 0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 < r["val_bpb"] < 10 and r["val_loss"] > 0 for r in evals)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    # The console shows the log line fields, the evaluation and a sample.
    assert "tok/s" in stdout and "mfu n/a" in stdout and "val_bpb" in stdout and "sample:" in stdout


def test_resume_continues_exactly(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = trained_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "checkpoints" / "latest").write_text("step_000003\n")
    (resumed / "metrics.jsonl").write_text("")
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={resumed}", "checkpoint.every_steps=3",
               "checkpoint.keep_last=5", "checkpoint.resume=auto", *QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout
    original = {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if r["kind"] == "train"}
    assert sorted(again) == [4, 6]
    for step in again:
        assert again[step] == original[step], step  # bit-identical: weights, optimizer, data, RNG restored


def test_generate_from_run(trained_run: tuple[Path, str]) -> None:
    out, _ = trained_run
    proc = cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--num-samples", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ROMEO:") == 2 and "--- sample 2" in proc.stdout


def test_export_run_to_hf_and_torch(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """`bigtrain export` of a run folder takes its latest checkpoint. (Exported logits against transformers:
    tests/checkpoint/test_export.py and test_reshard.py.)"""
    import torch

    from bigtrain.checkpoint.hf import read_safetensors_dir
    from bigtrain.checkpoint.manager import load_model_weights

    out, _ = trained_run
    proc = cli("export", str(out), "--to", "hf", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    proc = cli("export", str(out), "--to", "torch", str(tmp_path / "model.pt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights, manifest = load_model_weights(out / "checkpoints" / "step_000006")
    assert manifest.step == 6
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    hf = read_safetensors_dir(tmp_path / "hf")
    assert hf["model.embed_tokens.weight"].equal(weights["tok_embeddings.weight"])


@pytest.mark.parametrize(("where", "kind"), [(".", "is"), ("..", "holds"), ("checkpoints", "lies inside"),
                                            ("hf-inside", "lies inside")])
def test_export_refuses_an_output_overlapping_the_run(trained_run: tuple[Path, str], where: str, kind: str) -> None:
    """--overwrite onto the run folder, a folder holding it, or one inside it would delete the run: exit 2, and
    every checkpoint is still there (also when the source is named by its checkpoint folder)."""
    out, _ = trained_run
    target = (out / where).resolve() if where in (".", "..") else out / where
    for source in (out, out / "checkpoints" / "step_000006"):
        proc = cli("export", str(source), "--to", "hf", str(target), "--overwrite")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{kind} the run being exported" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert (out / "checkpoints" / "step_000006" / "manifest.json").is_file()
    assert not (out / "hf-inside").exists()


def test_python_m_and_config_show() -> None:
    proc = run_cli("config", "show", "configs/debug.yaml", "train.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.01" in proc.stdout and "preset: debug" in proc.stdout


@pytest.mark.parametrize(
    "args,needles",
    [
        (["train", "configs/nope.yaml"], ["does not exist"]),
        (["train", "configs/debug.yaml", "train.lrr=1"], ["train.lrr", "Did you mean 'train.lr'"]),
        (["train", "configs/debug.yaml", "model.preset=llama9"], ["unknown model preset"]),
        (["train", "configs/debug.yaml", "model.dim=100"], ["model.dim", "num_heads"]),
        (["config", "show", "configs/debug.yaml", "data.seq_len=abc"], ["data.seq_len", "integer"]),
        (["generate", "/nonexistent/run"], ["does not exist"]),
        (["data", "prepare", "/nonexistent/*.txt", "--out-dir", "/tmp/bigtrain-never"], ["/nonexistent"]),
    ],
)
def test_bad_input_exit_2(args: list[str], needles: list[str]) -> None:
    assert_user_error(cli(*args), *needles)


def test_malformed_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: [1, 2\n")
    assert_user_error(cli("train", str(bad)), "not valid YAML")


def test_missing_corpus_leaves_nothing_behind(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "run"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={out}", f"data.train_path={tmp_path}/missing")
    assert_user_error(proc, "missing")
    assert not out.exists()


def test_empty_corpus_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    proc = cli("data", "prepare", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "out"))
    assert_user_error(proc)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_model_vocab(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "run"
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={out}", "model.vocab_size=1024")
    assert_user_error(proc, "model.vocab_size", "4096")
    assert not out.exists()


def test_unwritable_run_folder(tmp_path: Path, demo_data: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={blocker}/run")
    assert_user_error(proc, "run.out_dir")


def test_tokenizer_from_other_corpus_is_rejected(tmp_path: Path, demo_data: Path) -> None:
    from bigtrain.data.tokenizer import Tokenizer

    other = tmp_path / "tok.json"
    Tokenizer.byte_level().save(other)
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={tmp_path}/run", f"data.tokenizer={other}")
    assert_user_error(proc, "tokenizer")


def test_nccl_on_cpu_exit_2(tmp_path: Path, demo_data: Path) -> None:
    proc = cli("train", "configs/debug.yaml", f"run.out_dir={tmp_path}/run", "run.device=cpu", "parallel.strategy=ddp",
               "parallel.backend=nccl", "train.max_steps=1")
    assert_user_error(proc, "parallel.backend=nccl")


def test_unknown_verb_is_usage_error() -> None:
    proc = cli("trian")
    assert proc.returncode == 2 and "invalid choice: 'trian'" in proc.stderr, proc.stderr


def test_import_does_not_pull_heavy_optional_modules() -> None:
    code = ("import sys, bigtrain, bigtrain.cli, bigtrain.config, bigtrain.model, bigtrain.train.trainer; "
            "bad = [m for m in ('deepspeed', 'wandb', 'datasets', 'triton') if m in sys.modules]; print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# Runs the CLI with the optional packages made unimportable, as on a GPU image where bigtrain was
# installed with --no-deps: training works; features that need a missing package say so (exit 2).
# One process runs every invocation in turn (argv lists as JSON in argv[1]) and prints one JSON result each.
WITHOUT_OPTIONAL = """
import contextlib, importlib.abc, importlib.machinery, io, json, sys
class Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"deepspeed", "datasets", "wandb", "accelerate", "matplotlib", "transformers"}:
            return importlib.machinery.ModuleSpec(name, self)  # found, but importing it fails
    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {module.__name__!r}")
sys.meta_path.insert(0, Missing())
from bigtrain.cli import main
class Captured(io.StringIO):
    def __init__(self, real):
        super().__init__()
        self.real = real
    def fileno(self):
        return self.real.fileno()
sys.argv[0] = "bigtrain"
for argv in json.loads(sys.argv[1]):
    out, err = Captured(sys.__stdout__), Captured(sys.__stderr__)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            import traceback
            traceback.print_exc()
            code = "raised"
    print("RESULT " + json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


def run_without_optional(*invocations: list[str]) -> list[subprocess.CompletedProcess]:
    """Each invocation's (exit status, stdout, stderr), all run in one process without the optional packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_DISABLED")}  # the config decides
    proc = subprocess.run([sys.executable, "-c", WITHOUT_OPTIONAL, json.dumps(invocations)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "2"})
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == len(invocations), proc.stdout + proc.stderr
    return [subprocess.CompletedProcess(argv, r["code"], r["stdout"], r["stderr"])
            for argv, r in zip(invocations, results, strict=True)]


def test_trains_without_optional_packages(tmp_path: Path, demo_data: Path) -> None:
    tiny = [f"run.out_dir={tmp_path / 'run'}", "train.max_steps=2", "eval.every_steps=0", "eval.max_batches=1",
            "eval.final_max_batches=1", "log.sample_at_end=false", "checkpoint.every_steps=1", "run.num_threads=2"]
    # Text sources need no optional package (tests/data/test_documents.py streams one with `datasets` unimportable).
    refused = [
        (["parallel.strategy=zero", "train.optimizer=adamw"],
         ["parallel.strategy=zero needs the `deepspeed` package", "parallel.strategy=fsdp"]),
        (["log.wandb.mode=offline"], ["log.wandb.mode=offline needs the `wandb` package", "log.wandb.mode=disabled"]),
    ]
    trained, *results = run_without_optional(
        ["train", "configs/debug.yaml", *tiny],
        *(["train", "configs/debug.yaml", *tiny, "checkpoint.resume=never", *extra] for extra, _ in refused),
        ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "manifest.json").is_file()
    for proc, (_, needles) in zip(results[:-1], refused, strict=True):  # the last result is the plot
        assert_user_error(proc, *needles)
    assert_user_error(results[-1], "bigtrain plot needs the `matplotlib` package")
