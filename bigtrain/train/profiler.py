"""The profiler window (``log.profile.steps: [first, last]``), rank 0 only.

Writes to RUN_DIR/profile/:
- ``trace_steps_A-B.json``: a Chrome/Perfetto trace of those optimizer steps (open it in
  https://ui.perfetto.dev or chrome://tracing);
- ``ops_steps_A-B.txt``: the top operators by self time (CPU, and CUDA when on a GPU);
- ``memory_steps_A-B.pickle`` on CUDA: an allocator snapshot with stack traces for the window
  (drag it into https://pytorch.org/memory_viz).

torch.profiler is imported only when a window is configured.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bigtrain import messages


class ProfilerWindow:
    """Starts the profiler before step ``first`` and writes the results after step ``last``."""

    def __init__(self, steps: list[int] | tuple[int, ...], run_dir: Path, device: torch.device) -> None:
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.out_dir = run_dir / "profile"
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self._prof: Any = None
        self.written: list[Path] = []

    @property
    def active(self) -> bool:
        return self._prof is not None

    def before_step(self, next_step: int) -> float:
        """Call before the step that will be numbered ``next_step`` (1-based); returns the seconds
        spent here (starting the profiler), which the trainer keeps out of its step time."""
        if next_step != self.first or self._prof is not None:
            return 0.0
        t0 = time.perf_counter()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            # Stack traces for every allocation in the window (bounded: old entries are dropped).
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self._prof.start()
        return time.perf_counter() - t0

    def after_step(self, step: int) -> float:
        """Call after step ``step`` finished; writes the results once the window is complete and
        returns the seconds spent here."""
        if self._prof is None or step < self.last:
            return 0.0
        return self.stop()

    def stop(self) -> float:
        """Stop and write whatever was recorded (also used when training ends inside the window)."""
        if self._prof is None:
            return 0.0
        t0 = time.perf_counter()
        prof, self._prof = self._prof, None
        if self.cuda:
            torch.cuda.synchronize()
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"steps_{self.first}-{self.last}"
        trace = self.out_dir / f"trace_{tag}.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        ops = self.out_dir / f"ops_{tag}.txt"
        ops.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
        self.written = [trace, ops]
        if self.cuda:
            snapshot = self.out_dir / f"memory_{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        messages.say(f"profile of steps {self.first}-{self.last} written to {self.out_dir}/ "
                  f"({', '.join(p.name for p in self.written)})")
        return time.perf_counter() - t0
