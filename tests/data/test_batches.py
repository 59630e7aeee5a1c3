"""TokenStream reads across shards and validation windows (training order: test_data_pipeline.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bigtrain.data.batches import TokenStream, eval_batches
from bigtrain.data.shards import Shard, write_shard


def make_stream(tmp_path: Path, sizes: tuple[int, ...] = (1000, 537)) -> TokenStream:
    shards, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"shard_{i}.bin"
        # Token value = its global position mod 500, so windows can be located.
        write_shard(path, (np.arange(start, start + n) % 500).astype(np.uint16), num_docs=1, num_bytes=n,
                    vocab_size=512, eos_id=511, tokenizer_fingerprint="test")
        shards.append(Shard(path))
        start += n
    return TokenStream(shards)


def test_reads_span_shards(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    assert stream.num_tokens == 1537
    assert list(stream.read(995, 10)) == [v % 500 for v in range(995, 1005)]


def test_eval_batches_fixed_and_split_over_ranks(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    all_batches = list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=0))
    assert len(all_batches) == (1536 // 16) // 4
    shards = [list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=0, rank=r, world_size=2))
              for r in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(all_batches)
    assert len(list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=3))) == 3


def test_eval_budget_smaller_than_world_size_still_evaluates(tmp_path: Path) -> None:
    """eval.max_batches=1 on 2 ranks rounds up to one batch per rank instead of evaluating nothing."""
    stream = make_stream(tmp_path)
    per_rank = [list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=1, rank=r, world_size=2))
                for r in range(2)]
    assert [len(b) for b in per_rank] == [1, 1]
    assert not np.array_equal(per_rank[0][0].inputs.numpy(), per_rank[1][0].inputs.numpy())
