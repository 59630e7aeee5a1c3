"""The tolerance policy for run-vs-run numerics tests (docs/architecture.md, "Tolerance policy").

A run-vs-run test compares two trainings that should compute the same mathematics by different routes
(a layout against ``single``, a resume on another layout against the straight run). The routes sum in
different orders, and different CPUs (AVX2, AVX-512, scalar kernels) round the same sum differently,
so such a comparison must hold on every x86-64 CPU, not just on the one it was written on:

1. **Run it in float64** (``train.precision=fp64``): rounding is ~1e-16 per operation, so layouts and
   instruction sets agree to ~3e-15 after 5-20 steps (measured), and ``FP64_REL`` leaves four orders
   of magnitude of margin above that while a real reduction or scaling bug misses it by six or more
   (``tests/parallel/test_parity.py::test_planted_bug_fails_every_tolerance`` plants one to prove it).
   Discrete decisions (MoE top-k routing) then only flip at exact ties: the MoE parity tests measure
   their smallest router margin and require it far above fp64 rounding.
2. **Only what cannot run fp64 stays fp32**: DeepSpeed ZeRO (its fp32 master weights). Those tests use
   dense models (no discrete decisions) and ``FP32_REL``, 100x the largest difference measured between
   AVX2 and scalar kernels (5e-7).
3. **Bitwise** (``==``) only between two runs of the same process configuration on the same machine
   (straight vs resumed on one layout), never across layouts or machines.
4. Weights are compared norm-wise per tensor (``assert_weights_close``): Adam divides by the root of the
   second moment, so an element whose gradient is pure rounding noise moves by a noisy ±lr; the tensor's
   norm is what a layout bug changes.

``make test-isa`` runs every test that follows this policy under ``ATEN_CPU_CAPABILITY=default`` and under
the machine's best capability.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FP64 = "train.precision=fp64"
# fp64 runs of different layouts or CPUs: measured within 3e-15 over 5-20 steps; a planted scaling bug
# of 1% in one rank's gradient shard misses by 1.4e-3.
FP64_REL = 1e-10
# fp32 runs (DeepSpeed ZeRO only): measured within 5e-7 of single@fp32 under AVX2 and scalar kernels (5e-7).
FP32_REL = 5e-5
KEYS = ("loss", "grad_norm")


def max_rel_diff(got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]],
                 keys: Iterable[str] = KEYS) -> float:
    """The largest relative difference of ``keys`` between two runs' train records, step by step."""
    assert [r["step"] for r in got] == [r["step"] for r in want], ([r["step"] for r in got],
                                                                  [r["step"] for r in want])
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        for key in keys:
            worst = max(worst, abs(g[key] - w[key]) / max(abs(w[key]), 1e-300))
    return worst


def assert_runs_close(got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]], rel: float,
                      what: str) -> None:
    """Every step's loss and grad norm within ``rel`` (relative); the message names the worst step."""
    assert got and [r["step"] for r in got] == [r["step"] for r in want], (
        f"{what}: steps {[r['step'] for r in got]} vs {[r['step'] for r in want]}")
    for g, w in zip(got, want, strict=True):
        for key in KEYS:
            diff = abs(g[key] - w[key]) / max(abs(w[key]), 1e-300)
            assert diff <= rel, f"{what}: step {g['step']} {key} {g[key]!r} vs {w[key]!r} (rel {diff:.1e} > {rel:.0e})"


def assert_weights_close(got: Mapping[str, Any], want: Mapping[str, Any], rel: float, what: str) -> None:
    """Same tensor names; each tensor within ``rel`` of the reference, norm-wise (policy point 4)."""
    assert got.keys() == want.keys(), f"{what}: {sorted(set(got) ^ set(want))}"
    for key, tensor in want.items():
        diff = float((got[key].double() - tensor.double()).norm())
        norm = float(tensor.double().norm())
        assert diff <= rel * norm, f"{what}: {key} differs by {diff:.3e} (norm {norm:.3e}, rel {rel:.0e})"
