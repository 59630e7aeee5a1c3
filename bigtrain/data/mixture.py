"""Mixing: a deterministic weighted interleave of sources.

Global sample ``i`` goes to the active source with the largest deficit
``p_k * (n + 1) - c_k``, where ``c_k`` counts the samples source ``k`` has given so far,
``n = sum(c_k)`` over active sources and ``p_k`` its weight renormalized over the active
sources (ties go to the lower index). After any prefix of the stream every source is within
one sample of its share, the choice depends only on the counts (the pipeline's state), and a
source that reaches its ``max_epochs`` cap simply leaves the active set.
"""
from __future__ import annotations

from collections.abc import Sequence

from bigtrain.errors import UserError


def pick(weights: Sequence[float], counts: Sequence[int], active: Sequence[bool]) -> int:
    """Index of the source that supplies the next sample."""
    total_w = sum(w for w, a in zip(weights, active, strict=True) if a)
    if total_w <= 0:
        raise UserError("every data source reached its max_epochs cap: there is no data left to train on. "
                        "Raise data.sources[].max_epochs (0 = no cap) or lower train.max_steps.")
    n = sum(c for c, a in zip(counts, active, strict=True) if a)
    best, best_deficit = -1, float("-inf")
    for k, (w, c, a) in enumerate(zip(weights, counts, active, strict=True)):
        if a:
            deficit = w / total_w * (n + 1) - c
            if deficit > best_deficit:
                best, best_deficit = k, deficit
    return best
