"""Training loader: deterministic order, world-size independence, resumable state, eval windows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.data.loader import TokenStream, TrainLoader, eval_batches
from bigtrain.data.shards import Shard, write_shard
from bigtrain.errors import UserError


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


def loader(stream: TokenStream, rank: int = 0, world: int = 1, **kw: object) -> TrainLoader:
    args = dict(seq_len=16, micro_batch_size=2, global_batch_seqs=8, rank=rank, world_size=world, seed=7)
    args.update(kw)
    return TrainLoader(stream, **args)  # type: ignore[arg-type]


def rows(batches: list) -> torch.Tensor:
    return torch.cat([b.inputs for b in batches])


def test_reads_span_shards(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    assert stream.num_tokens == 1537
    assert list(stream.read(995, 10)) == [v % 500 for v in range(995, 1005)]


def test_targets_are_inputs_shifted(tmp_path: Path) -> None:
    batch = loader(make_stream(tmp_path)).next_step()[0]
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_same_seed_same_order_and_epoch_reshuffle(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    a, b = loader(stream), loader(stream)
    for _ in range(30):  # > 2 epochs of 95 windows
        assert torch.equal(rows(a.next_step()), rows(b.next_step()))
    other = loader(stream, seed=8)
    assert not torch.equal(rows(loader(stream).next_step()), rows(other.next_step()))


def test_epoch_visits_every_window_once(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    ld = loader(stream, global_batch_seqs=5, micro_batch_size=5)
    starts = [ld._window(i) for i in range(ld.num_windows)]
    assert sorted(starts) == list(range(ld.num_windows))


def test_global_stream_is_independent_of_world_size(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    single = loader(stream)
    two = [loader(stream, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        joined = torch.cat([rows(ld.next_step()) for ld in two])
        assert torch.equal(rows(single.next_step()), joined)


def test_state_dict_resumes_exactly(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    a = loader(stream)
    for _ in range(13):
        a.next_step()
    b = loader(stream)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert torch.equal(rows(a.next_step()), rows(b.next_step()))


def test_eval_batches_fixed_and_split_over_ranks(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    all_batches = list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=0))
    assert len(all_batches) == (1536 // 16) // 4
    shards = [list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(all_batches)
    assert len(list(eval_batches(stream, seq_len=16, micro_batch_size=4, max_batches=3))) == 3


def test_too_little_data_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="seq_len"):
        loader(make_stream(tmp_path, sizes=(10,)))
