"""DataPipeline: sources → tokenize → pack → mix → this rank's slice of each global batch.

Order is a pure function of (seed, global sample index, source cursors): optimizer step ``s``
consumes global samples ``[s*G, (s+1)*G)``; each is assigned to a source by the deterministic
weighted interleave of :mod:`bigtrain.data.mixture` and is that source's next sample. Every rank
walks the whole global batch (cheap for shards: only counters move; text sources are read in
full by every rank) and materializes only its contiguous slice ``[r*G/R, (r+1)*G/R)``. So the
token stream does not depend on the world size, and the state — the global sample index, each
source's sample count, and each text source's reading position — is a small JSON-able dict that
resumes exactly on any number of ranks.

Steps are prepared ``prefetch_steps`` ahead in a background thread (pinned memory on CUDA, so
the trainer's ``.to(device, non_blocking=True)`` overlaps compute); the state handed to a
checkpoint is the one after the last step *returned*, not the last one prepared.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from bigtrain.data.batches import Batch
from bigtrain.data.config import DataConfig
from bigtrain.data.mixture import pick
from bigtrain.data.packing import document_ids
from bigtrain.data.sources import Exhausted, ShardSource, Source, TextSource
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import UserError

STATE_FORMAT = 2  # 1 = the single-shard TrainLoader's {"next_sample": n, ...}, still accepted


class DataPipeline:
    """This rank's training batches, deterministic and Stateful (``state_dict``/``load_state_dict``)."""

    def __init__(self, sources: list[Source], *, seq_len: int, micro_batch_size: int, global_batch_seqs: int,
                 rank: int, world_size: int, seed: int, eos_id: int, document_ids: bool = False,
                 prefetch_steps: int = 0, pin_memory: bool = False) -> None:
        if not sources:
            raise UserError("no training sources configured; set data.train_path or list data.sources.")
        if global_batch_seqs % world_size or (global_batch_seqs // world_size) % micro_batch_size:
            raise ValueError(f"global batch of {global_batch_seqs} sequences does not split into {world_size} ranks "
                             f"x micro-batches of {micro_batch_size}")
        self.sources = sources
        self.seq_len, self.micro, self.global_batch_seqs = seq_len, micro_batch_size, global_batch_seqs
        self.rank, self.world_size, self.per_rank = rank, world_size, global_batch_seqs // world_size
        self.seed, self.eos_id, self.document_ids = seed, eos_id, document_ids
        self.prefetch_steps, self.pin_memory = prefetch_steps, pin_memory
        self.weights = [s.weight for s in sources]
        # Producer-side position (may run ahead of the consumer by prefetch_steps).
        self.next_sample = 0
        self.counts = [0] * len(sources)
        self.active = [True] * len(sources)
        self._consumed = self._snapshot()
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wait_s = 0.0

    @classmethod
    def from_config(cls, data: DataConfig, *, tokenizer: Tokenizer, vocab_size: int, micro_batch_size: int,
                    global_batch_seqs: int, rank: int, world_size: int, seed: int,
                    pin_memory: bool = False) -> DataPipeline:
        """Open every source of ``data`` (checking files, tokenizer and vocab) and build the pipeline."""
        sources: list[Source] = []
        try:
            for i, cfg in enumerate(data.source_list()):
                name = cfg.display_name(i)
                if cfg.kind == "shards":
                    sources.append(ShardSource(cfg, name, i, seq_len=data.seq_len, vocab_size=vocab_size,
                                               fingerprint=tokenizer.fingerprint, seed=seed, shuffle=data.shuffle))
                else:
                    sources.append(TextSource(cfg, name, i, tokenizer=tokenizer, seq_len=data.seq_len, seed=seed,
                                              shuffle=data.shuffle, add_bos=data.add_bos, add_eos=data.add_eos,
                                              num_workers=data.num_workers, max_bad_fraction=data.max_bad_fraction))
        except BaseException:
            for s in sources:
                s.close()
            raise
        return cls(sources, seq_len=data.seq_len, micro_batch_size=micro_batch_size,
                   global_batch_seqs=global_batch_seqs, rank=rank, world_size=world_size, seed=seed,
                   eos_id=tokenizer.eos_id, document_ids=data.document_ids, prefetch_steps=data.prefetch_steps,
                   pin_memory=pin_memory)

    # ------------------------------------------------------------------ producing
    def _sample(self, out: np.ndarray | None) -> None:
        """Write the next global sample of the mix into ``out`` (or only advance, for another rank's)."""
        while True:
            k = 0 if len(self.sources) == 1 and self.active[0] else pick(self.weights, self.counts, self.active)
            try:
                self.sources[k].take(self.counts[k], out)
            except Exhausted:
                self.active[k] = False
                if len(self.sources) == 1:
                    pick(self.weights, self.counts, self.active)  # raises the "no data left" UserError
                continue
            self.counts[k] += 1
            return

    def _produce(self) -> tuple[list[Batch], dict[str, Any]]:
        """Walk one global batch; return this rank's micro-batches and the state after the step."""
        lo, g_total = self.rank * self.per_rank, self.global_batch_seqs
        mine = np.empty((self.per_rank, self.seq_len + 1), dtype=np.int64)
        src = self.sources[0]
        if len(self.sources) == 1 and isinstance(src, ShardSource) and (
                (cap := src.limit()) is None or self.counts[0] + g_total <= cap):
            # One random-access source: other ranks' samples need no walk, only the count moves.
            for i in range(self.per_rank):
                src.take(self.counts[0] + lo + i, mine[i])
            self.counts[0] += g_total
        else:
            for g in range(g_total):
                self._sample(mine[g - lo] if lo <= g < lo + self.per_rank else None)
        self.next_sample += g_total
        batches = []
        for m in range(0, self.per_rank, self.micro):
            arr = torch.from_numpy(mine[m: m + self.micro])
            batch = Batch(arr[:, :-1], arr[:, 1:])
            if self.document_ids:
                doc, pos = document_ids(mine[m: m + self.micro, :-1], self.eos_id)
                batch.doc_ids, batch.position_ids = torch.from_numpy(doc), torch.from_numpy(pos)
            batches.append(batch.pin_memory() if self.pin_memory else batch)
        return batches, self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "next_sample": self.next_sample, "seed": self.seed, "seq_len": self.seq_len,
            "sources": {s.name: {"count": self.counts[i], "active": int(self.active[i]), **s.state_dict()}
                        for i, s in enumerate(self.sources)},
            "stats": {s.name: s.stats() for s in self.sources},
        }

    def _run(self, q: queue.Queue[Any], stop: threading.Event) -> None:
        """Background producer: steps in order, or the exception that stopped it."""
        try:
            while not stop.is_set():
                item = self._produce()
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            q.put(e)

    # ------------------------------------------------------------------ the trainer's interface
    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        t0 = time.perf_counter()
        if self.prefetch_steps == 0:
            batches, self._consumed = self._produce()
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch_steps)
                self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop),
                                                name="bigtrain-data", daemon=True)
                self._thread.start()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop_thread()
                raise item
            batches, self._consumed = item
        self._wait_s += time.perf_counter() - t0
        return batches

    @property
    def epoch(self) -> float:
        """Epochs of the heaviest source consumed so far."""
        k = max(range(len(self.sources)), key=lambda i: self.weights[i])
        src = self.sources[k]
        if isinstance(src, ShardSource):
            return src.progress(self._consumed["sources"][src.name]["count"])
        st = self._consumed["sources"][src.name]
        return float(st["epoch"] + st["file_pos"] / max(1, st["num_files"]))

    def state_dict(self) -> dict[str, Any]:
        """Global position after the last step returned (JSON-able; independent of the world size)."""
        return {k: v for k, v in self._consumed.items() if k != "stats"} | {
            "sources": {name: {**st, **{f"stat_{k}": v for k, v in self._consumed["stats"][name].items()}}
                        for name, st in self._consumed["sources"].items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the step at which ``state`` was taken (on any world size)."""
        self._stop_thread()
        if "sources" not in state:  # format 1: the single-shard loader's state
            state = {"next_sample": state["next_sample"], "seq_len": state.get("seq_len", self.seq_len),
                     "sources": {self.sources[0].name: {"count": state["next_sample"], "active": 1}}}
        if int(state.get("seq_len", self.seq_len)) != self.seq_len:
            raise UserError(f"the checkpoint's data position was saved with data.seq_len={state['seq_len']}, but "
                            f"data.seq_len is {self.seq_len} now; resume with the same seq_len.")
        saved = state["sources"]
        if len(self.sources) == 1 and len(saved) == 1 and self.sources[0].name not in saved:
            saved = {self.sources[0].name: next(iter(saved.values()))}  # a renamed single source
        self.next_sample = int(state["next_sample"])
        for i, src in enumerate(self.sources):
            st = saved.get(src.name, {"count": 0, "active": 1})  # a source added since the checkpoint starts fresh
            self.counts[i], self.active[i] = int(st["count"]), bool(st["active"])
            if "epoch" in st or isinstance(src, ShardSource):
                src.load_state_dict({k[5:] if k.startswith("stat_") else k: v for k, v in st.items()})
        self._consumed = self._snapshot()

    def log_stats(self) -> dict[str, int | float]:
        """Per-source consumed counts (and text-source skip counters) plus the data wait since the last call."""
        out: dict[str, int | float] = {}
        for src in self.sources:
            st = self._consumed["sources"][src.name]
            out[f"data/{src.name}/samples"] = st["count"]
            for key, value in self._consumed["stats"][src.name].items():
                out[f"data/{src.name}/{key}"] = value
        out["data_wait_s"], self._wait_s = self._wait_s, 0.0
        return out

    def summary(self) -> str:
        """One line for the run header."""
        parts = []
        total = sum(self.weights)
        for s in self.sources:
            size = f"{s.num_tokens:,} tokens" if isinstance(s, ShardSource) else f"{s.kind}, streamed"
            parts.append(f"{s.name} ({size}, {s.weight / total:.0%})" if len(self.sources) > 1 else size)
        return ", ".join(parts)

    def shard_tokens(self) -> int | None:
        """Total tokens when every source is shards (for epoch estimates), else None."""
        shards = [s for s in self.sources if isinstance(s, ShardSource)]
        if len(shards) == len(self.sources):
            return sum(s.num_tokens for s in shards)
        return None

    # ------------------------------------------------------------------ shutdown
    def _stop_thread(self) -> None:
        """Stop the producer and rewind the producer-side position to the consumed one."""
        if self._thread is not None:
            self._stop.set()
            assert self._queue is not None
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread = self._queue = None
        if self.next_sample != self._consumed["next_sample"]:
            consumed = self._consumed
            self._consumed = {}
            self._load_positions(consumed)

    def _load_positions(self, snap: dict[str, Any]) -> None:
        self.next_sample = snap["next_sample"]
        for i, src in enumerate(self.sources):
            st = snap["sources"][src.name]
            self.counts[i], self.active[i] = st["count"], bool(st["active"])
            src.load_state_dict({**st, **snap["stats"][src.name]})
        self._consumed = self._snapshot()

    def close(self) -> None:
        """Stop the prefetch thread and the worker processes."""
        self._stop_thread()
        for s in self.sources:
            s.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to report to
            self.close()
