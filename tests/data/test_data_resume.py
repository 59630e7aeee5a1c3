"""Exact data resume across world sizes with real rank processes (CPU).

One launch of 2 in-process ranks (tests/helpers.py ``run_distributed``) runs every scenario
(shards, jsonl, a 2-source mixture): each rank runs k steps, saves its state, and continues
(2->2); and continues the state a 1-rank run saved (1->2). The pytest process computes the 1-rank
straight-through stream, continues rank 0's 2-rank state on 1 rank (2->1), and checks that every
joined global stream equals the straight one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.helpers import run_distributed

N, K = 12, 5  # steps in all, steps before the checkpoint


def _rows(batches: list) -> np.ndarray:
    return torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], 1) for b in batches]).numpy()


def worker(rank: int, spec_path: str) -> None:
    """One rank: for each scenario run K steps, save state, resume (2->2), and resume the 1-rank state (1->2)."""
    from tests.data.test_data_pipeline import data_config, pipeline

    world = int(os.environ["WORLD_SIZE"])
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for name, sources in spec["scenarios"].items():
        cfg = data_config(sources, seq_len=16, num_workers=1, prefetch_steps=1)
        p = pipeline(cfg, rank, world)
        first = [_rows(p.next_step()) for _ in range(K)]
        state = p.state_dict()
        p.close()
        (out / f"{name}.state2.rank{rank}.json").write_text(json.dumps(state))
        q = pipeline(cfg, rank, world)
        q.load_state_dict(json.loads(json.dumps(state)))
        rest = [_rows(q.next_step()) for _ in range(N - K)]
        q.close()
        r = pipeline(cfg, rank, world)
        r.load_state_dict(json.loads((out / f"{name}.state1.json").read_text()))
        from_one = [_rows(r.next_step()) for _ in range(N - K)]
        r.close()
        np.save(out / f"{name}.2to2.rank{rank}.npy", np.stack(first + rest))
        np.save(out / f"{name}.1to2.rank{rank}.npy", np.stack(from_one))


def test_resume_on_other_world_sizes_is_exact(tmp_path: Path) -> None:
    from tests.data.test_data_pipeline import data_config, global_steps, write_doc_shards, write_jsonl

    write_doc_shards(tmp_path / "s", 40, seed=1)
    write_jsonl(tmp_path / "j", files=3, docs_per_file=8, seed=2)
    shards = {"kind": "shards", "paths": [str(tmp_path / "s")]}
    jsonl = {"kind": "jsonl", "paths": [str(tmp_path / "j")]}
    scenarios: dict[str, Any] = {"shards": [shards], "jsonl": [jsonl],
                                 "mixture": [{**jsonl, "weight": 2}, {**shards, "weight": 1, "max_epochs": 1}]}
    straight = {}
    for name, sources in scenarios.items():
        cfg = data_config(sources, seq_len=16, num_workers=0)
        straight[name] = [s.numpy() for s in global_steps(cfg, 1, N)[0]]
        (tmp_path / f"{name}.state1.json").write_text(json.dumps(global_steps(cfg, 1, K)[1]))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "scenarios": scenarios}))
    run_distributed(worker, 2, str(spec), timeout_s=600, env={"HF_DATASETS_OFFLINE": "1"})

    for name, sources in scenarios.items():
        ref = straight[name]
        states = [json.loads((tmp_path / f"{name}.state2.rank{r}.json").read_text()) for r in range(2)]
        assert states[0] == states[1], f"{name}: ranks disagree on the global state"
        two = [np.load(tmp_path / f"{name}.2to2.rank{r}.npy") for r in range(2)]
        one_two = [np.load(tmp_path / f"{name}.1to2.rank{r}.npy") for r in range(2)]
        for s in range(N):
            assert np.array_equal(np.concatenate([two[0][s], two[1][s]]), ref[s]), f"{name} 2->2 step {s}"
        for s in range(N - K):
            assert np.array_equal(np.concatenate([one_two[0][s], one_two[1][s]]), ref[K + s]), f"{name} 1->2 step {s}"
        cfg = data_config(sources, seq_len=16, num_workers=0)
        two_one = global_steps(cfg, 1, N - K, state=states[0])[0]
        for s in range(N - K):
            assert np.array_equal(two_one[s].numpy(), ref[K + s]), f"{name} 2->1 step {s}"

