"""DataPipeline over shard sources: order, world-size independence, exact resume, coverage, mixing.

Also holds the synthetic-data helpers the other data tests import (tiny files in tmp_path).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bigtrain.data.config import DataConfig, SourceConfig
from bigtrain.data.mixture import pick
from bigtrain.data.packing import document_ids
from bigtrain.data.pipeline import DataPipeline
from bigtrain.data.shards import write_shard
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError
from bigtrain.sections import ConfigError, parse_section

TOK = Tokenizer.byte_level()  # vocab 257, EOS 256: token = UTF-8 byte, so expected streams are easy to write
EOS = TOK.eos_id


# --------------------------------------------------------------------------- helpers (shared)
def write_doc_shards(folder: Path, num_docs: int, seed: int, *, shards: int = 2) -> list[int]:
    """Shards of random byte documents each followed by EOS; returns the concatenated tokens."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [[*rng.integers(0, 256, size=int(rng.integers(1, 80))), EOS] for _ in range(num_docs)]
    all_tokens: list[int] = []
    per = -(-num_docs // shards)
    for i in range(shards):
        shard_docs = docs[i * per: (i + 1) * per]
        chunk = [t for d in shard_docs for t in d]
        write_shard(folder / f"shard_{i:05d}.bin", np.array(chunk, dtype=np.int64), num_docs=len(shard_docs),
                    num_bytes=len(chunk), vocab_size=TOK.vocab_size, eos_id=EOS, tokenizer_fingerprint=TOK.fingerprint)
        all_tokens += chunk
    return all_tokens


def write_jsonl(folder: Path, files: int, docs_per_file: int, seed: int, field: str = "text") -> list[list[str]]:
    """jsonl files of random ASCII documents; returns the texts per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        docs = [f"f{f}d{i} " + "".join(chr(c) for c in rng.integers(97, 123, size=int(rng.integers(1, 120))))
                for i in range(docs_per_file)]
        (folder / f"part_{f:03d}.jsonl").write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
        texts.append(docs)
    return texts


def data_config(sources: list[dict[str, Any]], **kw: Any) -> DataConfig:
    return parse_section(DataConfig, {"sources": sources, "tokenizer": "", **kw}, "data")


def pipeline(cfg: DataConfig, rank: int = 0, world: int = 1, *, micro: int = 2, global_seqs: int = 8,
             seed: int = 3, vocab_size: int = 257) -> DataPipeline:
    return DataPipeline.from_config(cfg, tokenizer=TOK, vocab_size=vocab_size, micro_batch_size=micro,
                                    global_batch_seqs=global_seqs, rank=rank, world_size=world, seed=seed)


def global_steps(cfg: DataConfig, world: int, steps: int, state: dict | None = None,
                 **kw: Any) -> tuple[list[torch.Tensor], dict]:
    """The global token stream of `steps` steps computed by `world` rank pipelines (rank slices joined)."""
    ranks = [pipeline(cfg, r, world, **kw) for r in range(world)]
    for p in ranks:
        if state is not None:
            p.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        per_rank = [torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], 1) for b in p.next_step()]) for p in ranks]
        out.append(torch.cat(per_rank))
    states = [p.state_dict() for p in ranks]
    for p in ranks:
        p.close()
    assert all(s == states[0] for s in states), "ranks disagree on the global state"
    return out, states[0]


def assert_resume_exact(cfg: DataConfig, n: int, k: int, before: int, after: int, **kw: Any) -> None:
    straight, _ = global_steps(cfg, 1, n, **kw)
    first, state = global_steps(cfg, before, k, **kw)
    rest, _ = global_steps(cfg, after, n - k, state=state, **kw)
    assert len(first + rest) == n
    for i, (a, b) in enumerate(zip(straight, first + rest, strict=True)):
        assert torch.equal(a, b), f"step {i} differs after resuming {before}->{after} at step {k}"


@pytest.fixture()
def shard_cfg(tmp_path: Path) -> DataConfig:
    write_doc_shards(tmp_path / "a", 60, seed=1)
    return data_config([{"kind": "shards", "paths": [str(tmp_path / "a")]}], seq_len=16, prefetch_steps=0)


# --------------------------------------------------------------------------- order and compatibility
def test_single_source_order_matches_the_seeded_window_permutation(shard_cfg: DataConfig) -> None:
    """The default single-shard order (what tests/golden pins): window perm_[seed, epoch][i] of tokens."""
    p = pipeline(shard_cfg, global_seqs=4, micro=4)
    src = p.sources[0]
    tokens = np.concatenate([s.tokens for s in src.stream.shards]).astype(np.int64)
    w = src.num_windows
    for i in range(2 * w + 3):  # over two epoch boundaries
        if i % 4 == 0:
            batch = p.next_step()[0]
        epoch, j = divmod(i, w)
        start = int(np.random.default_rng([3, epoch]).permutation(w)[j]) * 16
        assert torch.equal(batch.inputs[i % 4], torch.from_numpy(tokens[start: start + 16]))
        assert torch.equal(batch.targets[i % 4], torch.from_numpy(tokens[start + 1: start + 17]))


def test_old_loader_state_is_accepted(shard_cfg: DataConfig) -> None:
    a = pipeline(shard_cfg)
    for _ in range(5):
        a.next_step()
    b = pipeline(shard_cfg)
    b.load_state_dict({"next_sample": 40, "seed": 3, "seq_len": 16, "num_windows": 1})  # format 1
    assert torch.equal(a.next_step()[0].inputs, b.next_step()[0].inputs)


def test_state_is_plain_json_and_seq_len_change_is_rejected(shard_cfg: DataConfig) -> None:
    p = pipeline(shard_cfg)
    p.next_step()
    state = p.state_dict()
    assert json.loads(json.dumps(state)) == state
    other = pipeline(data_config([s.__dict__ for s in shard_cfg.sources], seq_len=8))
    with pytest.raises(UserError, match="seq_len"):
        other.load_state_dict(state)


@pytest.mark.parametrize("before,after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_exact_shards_and_mixture(tmp_path: Path, before: int, after: int) -> None:
    write_doc_shards(tmp_path / "a", 40, seed=1)
    write_doc_shards(tmp_path / "b", 15, seed=2, shards=1)
    single = data_config([{"kind": "shards", "paths": [str(tmp_path / "a")]}], seq_len=16)
    assert_resume_exact(single, n=30, k=13, before=before, after=after)  # crosses an epoch boundary
    mix = data_config([{"kind": "shards", "paths": [str(tmp_path / "a")], "weight": 3},
                       {"kind": "shards", "paths": [str(tmp_path / "b")], "weight": 1, "max_epochs": 1}],
                      seq_len=16, prefetch_steps=2)
    assert_resume_exact(mix, n=30, k=11, before=before, after=after)  # b leaves the mix mid-run


def test_prefetch_thread_does_not_change_stream_or_state(shard_cfg: DataConfig) -> None:
    sync, s1 = global_steps(shard_cfg, 1, 12)
    pre = data_config([s.__dict__ for s in shard_cfg.sources], seq_len=16, prefetch_steps=3)
    ahead, s2 = global_steps(pre, 1, 12)
    assert all(torch.equal(a, b) for a, b in zip(sync, ahead, strict=True)) and s1 == s2


def test_one_epoch_is_covered_once_and_ranks_are_disjoint(tmp_path: Path) -> None:
    """Tokens = their own position, so a sample's first token names its window."""
    n, seq = 16 * 48 + 1, 16
    write_shard(tmp_path / "pos.bin", np.arange(n), num_docs=1, num_bytes=n, vocab_size=1 << 20, eos_id=0,
                tokenizer_fingerprint=TOK.fingerprint)
    cfg = data_config([{"kind": "shards", "paths": [str(tmp_path / "pos.bin")]}], seq_len=seq)
    seen: list[set[int]] = []
    for r in range(2):
        p = pipeline(cfg, r, 2, vocab_size=1 << 20)
        starts: set[int] = set()
        for _ in range(48 // 8):
            for b in p.next_step():
                starts |= {int(x) for x in b.inputs[:, 0]}
        seen.append(starts)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(0, 48 * seq, seq))


# --------------------------------------------------------------------------- mixing
def test_mixture_proportions_within_two_percent(tmp_path: Path) -> None:
    write_doc_shards(tmp_path / "a", 20, seed=1)
    write_doc_shards(tmp_path / "b", 20, seed=2)
    write_doc_shards(tmp_path / "c", 20, seed=3)
    cfg = data_config([{"kind": "shards", "paths": [str(tmp_path / x)], "weight": w, "name": x}
                       for x, w in (("a", 0.5), ("b", 0.3), ("c", 0.2))], seq_len=16)
    p = pipeline(cfg, global_seqs=100, micro=100)
    for _ in range(100):
        p.next_step()
    stats = p.log_stats()
    counts = {x: stats[f"data/{x}/samples"] for x in "abc"}
    assert sum(counts.values()) == 10_000
    for x, w in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[x] / 10_000 - w) < 0.02
    p.close()


def test_pick_is_smooth_and_renormalizes() -> None:
    counts = [0, 0]
    for i in range(1, 101):
        counts[pick([1.0, 3.0], counts, [True, True])] += 1
        assert abs(counts[1] - 0.75 * i) <= 1  # every prefix within one sample
    assert pick([1.0, 3.0], [25, 75], [True, False]) == 0
    with pytest.raises(UserError, match="max_epochs"):
        pick([1.0], [3], [False])


def test_capped_source_leaves_the_mix(tmp_path: Path) -> None:
    write_doc_shards(tmp_path / "a", 40, seed=1)
    write_doc_shards(tmp_path / "small", 5, seed=2, shards=1)
    cfg = data_config([{"kind": "shards", "paths": [str(tmp_path / "a")], "name": "a"},
                       {"kind": "shards", "paths": [str(tmp_path / "small")], "name": "small", "max_epochs": 2}],
                      seq_len=16)
    p = pipeline(cfg)
    windows = p.sources[1].num_windows
    for _ in range(2 * windows // 4 + 5):
        p.next_step()
    stats = p.log_stats()
    assert stats["data/small/samples"] == 2 * windows
    assert stats["data/a/samples"] == p.state_dict()["next_sample"] - 2 * windows
    only = data_config([{"kind": "shards", "paths": [str(tmp_path / "small")], "max_epochs": 1}], seq_len=16)
    q = pipeline(only)
    with pytest.raises(UserError, match="max_epochs"):
        for _ in range(windows):
            q.next_step()


# --------------------------------------------------------------------------- packing helpers
def test_document_ids_and_positions() -> None:
    rows = np.array([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    doc, pos = document_ids(rows, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_batches_carry_ids_when_asked(shard_cfg: DataConfig) -> None:
    cfg = data_config([s.__dict__ for s in shard_cfg.sources], seq_len=16, document_ids=True)
    b = pipeline(cfg).next_step()[0]
    assert b.doc_ids is not None and b.position_ids is not None and b.doc_ids.shape == b.inputs.shape
    for row, d in zip(b.inputs, b.doc_ids, strict=True):
        ends = (row[:-1] == EOS).cumsum(0)
        assert torch.equal(d[1:], ends.to(d.dtype))
    assert pipeline(shard_cfg).next_step()[0].doc_ids is None


# --------------------------------------------------------------------------- bad input (shards, config)
def test_weight_must_be_positive() -> None:
    for w in (0, -1):
        with pytest.raises(ConfigError, match=r"data.sources\[0\].weight"):
            data_config([{"kind": "shards", "paths": ["x"], "weight": w}])


def test_missing_path_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "nope")]}]))
    with pytest.raises(UserError, match="No token shards"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "*.bin")]}]))


def test_empty_shard_source(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), num_docs=0, num_bytes=0, vocab_size=257, eos_id=EOS,
                tokenizer_fingerprint=TOK.fingerprint)
    with pytest.raises(UserError, match="no tokens"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "e.bin")]}]))


def test_token_ids_beyond_vocab(tmp_path: Path) -> None:
    tokens = np.arange(1000) % 700
    write_shard(tmp_path / "big.bin", tokens, num_docs=1, num_bytes=1000, vocab_size=700, eos_id=0,
                tokenizer_fingerprint=TOK.fingerprint)
    with pytest.raises(UserError, match=r"big.bin contains token id 699.*vocab_size is 257"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "big.bin")]}]))


def test_truncated_shard(tmp_path: Path) -> None:
    write_doc_shards(tmp_path / "t", 20, seed=1, shards=1)
    path = tmp_path / "t" / "shard_00000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"shard_00000.bin is truncated"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "t")]}]))


def test_shard_from_another_tokenizer(tmp_path: Path) -> None:
    write_shard(tmp_path / "o.bin", np.arange(100) % 200, num_docs=1, num_bytes=100, vocab_size=257, eos_id=EOS,
                tokenizer_fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match=r"o.bin was written with tokenizer 0123456789abcdef"):
        pipeline(data_config([{"kind": "shards", "paths": [str(tmp_path / "o.bin")]}]))


def test_default_config_is_one_shard_source() -> None:
    cfg = DataConfig()
    assert cfg.source_list() == [SourceConfig(kind="shards", paths=["data/demo/train"], name="train")]
