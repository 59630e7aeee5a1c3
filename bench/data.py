"""Data pipeline throughput: bigtrain's DataPipeline against the plain loaders people write by hand.

Two pairs, measured in one run on this machine, in tokens/s delivered to one rank:

1. memmap token shards through the full pipeline (mixing, rank slicing, batching, prefetch
   thread) vs raw ``numpy.memmap`` slicing of random windows into an int64 batch.
   Targets: pipeline >= 0.5x raw and >= 10M tokens/s/rank.
2. streaming jsonl tokenized on the fly through the pipeline (HF datasets streaming, DataLoader
   workers, batched `tokenizers`, packing) vs ``datasets.load_dataset(streaming=True).map(tokenize,
   batched=True).map(group_texts, batched=True)`` + ``torch.utils.data.DataLoader`` with the same
   number of workers. Target: pipeline >= 1.0x the baseline.

Repeats alternate baseline / pipeline so drift in machine speed hits both; medians are shown.

    python bench/data.py [--repeats 3] [--out bench/results/data-cpu-2core.md]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism, for both sides

import numpy as np
import torch
from benchinfo import cpu_name, git_commit, publish  # bench/ is on sys.path when run as a script

from bigtrain.data.config import DataConfig
from bigtrain.data.pipeline import DataPipeline
from bigtrain.data.shards import Shard, write_shard
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.sections import parse_section

WORDS = [
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "I", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "data", "model", "training", "token", "stream", "shard", "resume", "epoch",
]



# --------------------------------------------------------------------------- memmap pair
def make_shards(folder: Path, num_tokens: int, tok: Tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = num_tokens // 4
    for i in range(4):
        write_shard(folder / f"shard_{i:05d}.bin", rng.integers(0, tok.vocab_size, per, dtype=np.uint16), num_docs=1,
                    num_bytes=per, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_fingerprint=tok.fingerprint)
    return folder


def raw_memmap(folder: Path, seq_len: int, batch: int, steps: int) -> float:
    """What a hand-written loader does: random windows sliced from one memmap, stacked as int64."""
    arrays = [Shard(p).tokens for p in sorted(folder.glob("*.bin"))]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        mm = arrays[int(rng.integers(len(arrays)))]
        starts = rng.integers(0, len(mm) - seq_len - 1, batch)
        arr = torch.from_numpy(np.stack([mm[s: s + seq_len + 1] for s in starts]).astype(np.int64))
        x, y = arr[:, :-1], arr[:, 1:]
    assert x.shape == y.shape
    return steps * batch * seq_len / (time.perf_counter() - t0)


def pipeline_tokens_per_s(data: DataConfig, tok: Tokenizer, *, seq_len: int, batch: int, micro: int, steps: int,
                          rank: int = 0, world: int = 1) -> float:
    """Tokens/s this rank receives from DataPipeline.next_step (after one warm-up step)."""
    p = DataPipeline.from_config(data, tokenizer=tok, vocab_size=tok.vocab_size, micro_batch_size=micro,
                                 global_batch_seqs=batch * world, rank=rank, world_size=world, seed=0)
    p.next_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        batches = p.next_step()
    elapsed = time.perf_counter() - t0
    assert sum(b.inputs.numel() for b in batches) == batch * seq_len
    p.close()
    return steps * batch * seq_len / elapsed


# --------------------------------------------------------------------------- streaming pair
def make_jsonl(folder: Path, files: int, docs_per_file: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for f in range(files):
        lines = []
        for _ in range(docs_per_file):
            words = rng.choice(WORDS, size=int(rng.integers(100, 600)))
            lines.append(json.dumps({"text": " ".join(words) + "."}))
        path = folder / f"part_{f:03d}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def _collate(rows: list[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([r["input_ids"] for r in rows])


def hf_baseline(files: list[str], tok_path: str, *, seq_len: int, batch: int, workers: int, max_tokens: int) -> float:
    """The datasets recipe: streaming load → map(tokenize) → map(group_texts) → DataLoader(num_workers).

    Done the fast way a careful user would: the same `tokenizers` backend with one batched call
    per map batch, and a collate_fn building one tensor per batch (``with_format("torch")``
    makes a tensor per token id and is ~10x slower here, which would flatter the pipeline).
    """
    from datasets import load_dataset
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = HFTokenizer.from_file(tok_path)
    eos = hf_tok.token_to_id("<|endoftext|>")
    block = seq_len + 1

    def tokenize(ex: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": [[*e.ids, eos] for e in hf_tok.encode_batch_fast(ex["text"], add_special_tokens=False)]}

    def group_texts(ex: dict[str, Any]) -> dict[str, Any]:
        flat = [t for ids in ex["input_ids"] for t in ids]
        n = len(flat) // block * block
        return {"input_ids": [flat[i: i + block] for i in range(0, n, block)]}

    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=files, streaming=True, split="train")
    ds = ds.map(tokenize, batched=True, remove_columns=["text"]).map(group_texts, batched=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_collate)
    tokens = 0
    for b in loader:
        tokens += b[:, :-1].numel()
        if tokens >= max_tokens:
            break
    return tokens / (time.perf_counter() - t0)


def ours_streaming(files_dir: Path, tok: Tokenizer, *, seq_len: int, batch: int, workers: int,
                   max_tokens: int) -> float:
    """The same files through DataPipeline (jsonl source, DataLoader workers, prefetch thread)."""
    data = parse_section(DataConfig, {"sources": [{"kind": "jsonl", "paths": [str(files_dir)]}], "seq_len": seq_len,
                                      "num_workers": workers, "prefetch_steps": 2, "tokenizer": ""}, "data")
    t0 = time.perf_counter()
    p = DataPipeline.from_config(data, tokenizer=tok, vocab_size=tok.vocab_size, micro_batch_size=batch,
                                 global_batch_seqs=batch, rank=0, world_size=1, seed=0)
    tokens = 0
    while tokens < max_tokens:
        tokens += sum(b.inputs.numel() for b in p.next_step())
    rate = tokens / (time.perf_counter() - t0)
    p.close()
    return rate


# --------------------------------------------------------------------------- main
def alternate(n: int, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for _ in range(n):
        xs.append(a())
        ys.append(b())
    return xs, ys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--shard-tokens", type=int, default=64_000_000, help="tokens of synthetic shards")
    ap.add_argument("--jsonl-mb", type=float, default=12.0, help="approximate MB of synthetic jsonl")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for both streaming loaders")
    ap.add_argument("--tokenizer", default="data/demo/tokenizer.json", help="tokenizer.json (demo BPE, 4096)")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    ap.add_argument("--note", default="", help="a line added to the results (e.g. machine shared with other jobs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(args.tokenizer)
    seq, batch, micro = args.seq_len, 64, 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "shards", args.shard_tokens, tok)
        shard_cfg = parse_section(DataConfig, {"sources": [{"kind": "shards", "paths": [str(shards)]}], "seq_len": seq,
                                               "prefetch_steps": 2, "tokenizer": args.tokenizer}, "data")
        steps = 100
        raw, ours = alternate(args.repeats, lambda: raw_memmap(shards, seq, batch, steps),
                              lambda: pipeline_tokens_per_s(shard_cfg, tok, seq_len=seq, batch=batch, micro=micro,
                                                            steps=steps))
        rank8 = [pipeline_tokens_per_s(shard_cfg, tok, seq_len=seq, batch=batch, micro=micro, steps=steps, rank=3,
                                       world=8) for _ in range(args.repeats)]
        print(f"memmap: raw {statistics.median(raw) / 1e6:.1f}M tok/s, pipeline {statistics.median(ours) / 1e6:.1f}M, "
              f"rank 3 of 8 {statistics.median(rank8) / 1e6:.1f}M", flush=True)

        docs = int(args.jsonl_mb * 1e6 / 2200 / 4)
        files = make_jsonl(root / "jsonl", 4, docs)
        mb = sum(Path(f).stat().st_size for f in files) / 1e6
        stream_seq, stream_batch = 1024, 8
        budget = int(0.8 * mb * 1e6 / 4.5)  # ~80% of one epoch (~4.5 bytes/token with the demo BPE on this text)
        budget -= budget % (stream_seq * stream_batch)
        base, mine = alternate(
            args.repeats,
            lambda: hf_baseline(files, args.tokenizer, seq_len=stream_seq, batch=stream_batch, workers=args.workers,
                                max_tokens=budget),
            lambda: ours_streaming(root / "jsonl", tok, seq_len=stream_seq, batch=stream_batch, workers=args.workers,
                                   max_tokens=budget))
        print(f"streaming: datasets.map+DataLoader {statistics.median(base) / 1e6:.3f}M tok/s, "
              f"pipeline {statistics.median(mine) / 1e6:.3f}M", flush=True)

    r, o, o8 = statistics.median(raw), statistics.median(ours), statistics.median(rank8)
    b, m = statistics.median(base), statistics.median(mine)
    commit = git_commit()
    out = io.StringIO()
    out.write("# Data pipeline throughput (tokens/s delivered to one rank)\n\n")
    out.write(f"- date: {dt.date.today()}  commit: {commit} (plus the uncommitted data pipeline)\n")
    out.write(f"- device: CPU {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, 1 torch thread\n")
    out.write(f"- memmap: {args.shard_tokens / 1e6:.0f}M synthetic tokens in 4 uint16 shards (page cache warm), "
              f"seq_len {seq}, {batch} sequences/step ({micro} per micro-batch), {steps} timed steps, "
              f"pipeline with prefetch_steps=2\n")
    out.write(f"- streaming: {mb:.1f} MB jsonl in 4 files, demo BPE tokenizer (vocab {tok.vocab_size}), seq_len "
              f"{stream_seq}, {stream_batch} sequences/step, {args.workers} DataLoader workers on both sides, "
              f"{budget / 1e6:.2f}M tokens per run, start-up included on both sides\n")
    out.write(f"- {args.repeats} alternating repeats; medians shown, all repeats listed below\n")
    if args.note:
        out.write(f"- {args.note}\n")
    out.write("\n| loader | tokens/s | ratio vs baseline | target | verdict |\n|---|---:|---:|---|---|\n")
    out.write(f"| raw numpy.memmap slicing (baseline) | {r / 1e6:,.1f}M | 1.00 | | |\n")
    out.write(f"| DataPipeline, shard source, 1 rank | {o / 1e6:,.1f}M | {o / r:.2f} | >= 0.5x and >= 10M/s | "
              f"{'meets' if o / r >= 0.5 and o >= 1e7 else 'MISSES'} |\n")
    out.write(f"| DataPipeline, shard source, rank 3 of 8 | {o8 / 1e6:,.1f}M | {o8 / r:.2f} | >= 0.5x and >= 10M/s | "
              f"{'meets' if o8 / r >= 0.5 and o8 >= 1e7 else 'MISSES'} |\n")
    out.write(f"| datasets.map + DataLoader, jsonl (baseline) | {b / 1e6:,.3f}M | 1.00 | | |\n")
    out.write(f"| DataPipeline, jsonl source | {m / 1e6:,.3f}M | {m / b:.2f} | >= 1.0x | "
              f"{'meets' if m / b >= 1.0 else 'MISSES'} |\n\n")
    out.write("repeats (M tokens/s): raw " + ", ".join(f"{x / 1e6:.1f}" for x in raw)
              + "; pipeline " + ", ".join(f"{x / 1e6:.1f}" for x in ours)
              + "; rank 3 of 8 " + ", ".join(f"{x / 1e6:.1f}" for x in rank8)
              + "; datasets baseline " + ", ".join(f"{x / 1e6:.3f}" for x in base)
              + "; pipeline jsonl " + ", ".join(f"{x / 1e6:.3f}" for x in mine) + "\n")
    publish(out.getvalue(), args.out)


if __name__ == "__main__":
    main()
