"""`bigtrain data tokenizer train / prepare / inspect` end to end, and training (in process) on a mixture of
sources and with document ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli, train, train_records

QUICK = ["train.max_steps=3", "log.every_steps=1", "eval.every_steps=0", "eval.at_end=false",
         "checkpoint.at_end=false", "log.sample_at_end=false", "model.num_layers=1", "run.device=cpu",
         "train.global_batch_tokens=2048", "train.micro_batch_size=8", "data.seq_len=128"]


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"Story {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i))
    (folder / "web.jsonl").write_text("".join(
        json.dumps({"text": f"Page {i}: all work and no play makes a dull model. " * 8}) + "\n" for i in range(60)))
    return folder


def test_tokenizer_prepare_inspect(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "src")
    tok = tmp_path / "tok.json"
    proc = cli("data", "tokenizer", "train", str(src), "--vocab-size", "300", "--out", str(tok))
    assert proc.returncode == 0, proc.stderr
    assert "vocab 300" in proc.stdout and tok.is_file()
    out = tmp_path / "prepared"
    proc = cli("data", "prepare", str(src), "--out-dir", str(out), "--tokenizer", str(tok), "--num-workers", "2",
               "--val-fraction", "0.1")
    assert proc.returncode == 0, proc.stderr
    proc = cli("data", "inspect", str(out), "--sample-tokens", "20", "--check")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{manifest['splits']['train']['num_tokens']:,}" in text
    assert "documents" in text and "check: " in text and "sample (" in text
    assert ("Story" in text) or ("Page" in text)  # the decoded sample


@pytest.mark.parametrize("args,needle", [
    (["data", "inspect", "/nonexistent/x"], "does not exist"),
    (["data", "tokenizer", "train", "/nonexistent/a.txt", "--vocab-size", "300", "--out", "/tmp/t.json"],
     "does not exist"),
    (["data", "tokenizer", "train", "x.txt", "--vocab-size", "100", "--out", "/tmp/t.json"], "at least 257"),
    (["config", "show", "configs/debug.yaml", "data.sources=[{kind: jsonl, paths: [x.jsonl], weight: 0}]"],
     "data.sources[0].weight"),
    (["train", "configs/debug.yaml", "data.sources=[{kind: jsonl, paths: ['/nonexistent/*.jsonl']}]"],
     "matches no jsonl files"),
])
def test_bad_input_exits_2(args: list[str], needle: str) -> None:
    proc = cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_on_a_mixture_logs_per_source_counts(tmp_path: Path, demo_data: Path) -> None:
    src = _corpus(tmp_path / "src")
    sources = (f"data.sources=[{{kind: shards, paths: [{demo_data / 'train'}], weight: 3, name: plays}}, "
               f"{{kind: jsonl, paths: ['{src}/*.jsonl'], weight: 1, name: web}}]")
    out = tmp_path / "run"
    _, printed = train(out, sources, "data.document_ids=true", *QUICK)
    assert "plays (1,493,920 tokens, 75%), web (jsonl, streamed, 25%)" in "\n".join(printed)
    last = train_records(out)[-1]
    assert last["data/plays/samples"] + last["data/web/samples"] == 3 * 16
    assert last["data/plays/samples"] == 36 and last["data/web/docs"] > 0


def test_document_ids_reach_the_model(tmp_path: Path, demo_data: Path) -> None:
    """With data.document_ids the trainer passes doc ids to the model: attention stops at EOS, so the
    first loss differs from the plain-causal run on the same data and weights. (The golden run's first
    1,536 tokens hold no document boundary, so this uses 256-token sequences, which do.)"""
    golden = json.loads((Path(__file__).parents[1] / "golden" / "debug_20_steps.json").read_text())
    overrides = [o for o in golden["overrides"] if not o.startswith("train.max_steps")]
    overrides += ["train.max_steps=1", "data.seq_len=256", "train.global_batch_tokens=2048", "train.micro_batch_size=8"]
    train(tmp_path / "plain", *overrides, config=golden["config"])
    train(tmp_path / "docs", *overrides, "data.document_ids=true", config=golden["config"])
    record = train_records(tmp_path / "docs")[0]
    plain = train_records(tmp_path / "plain")[0]["loss"]
    assert record["loss"] == record["loss"] and abs(record["loss"] - plain) > 1e-4, (record["loss"], plain)
    assert abs(record["loss"] - plain) < 0.5  # same data and init: masked, not broken
