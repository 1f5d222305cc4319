"""Which source feeds each micro-batch (or each sample), as a pure function of (seed, index).

Nexus needs every rank on the same source in the same micro-batch (sync-every DDP averages the
gradients of one source) and a resumed run must replay the same sources. So the schedule keeps no
iteration state: ``sources(start, stop)`` and ``counts_before(index)`` can be evaluated for any
index in O(period), in any process, in any order. litdata's
``CombinedStreamingDataset(batching_method="per_stream")`` draws the stream from a per-rank RNG
state that advances with iteration, which gives neither property; hence this module.

Both schedules are periodic with period ``P = sum(q)``, where ``q`` are the weights as small
integers (``[1, 1, 1]`` -> ``P = 3``). Inside each period every source appears exactly ``q_s``
times, so mixture weights hold exactly every ``P`` units rather than only in expectation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import numpy as np

ScheduleKind = Literal["round_robin", "weighted"]

# Weights are turned into integers with at most this denominator; beyond it the period (and the
# schedule table every worker keeps) would grow without making the mixture measurably closer.
_MAX_DENOMINATOR = 1000


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Smallest integers proportional to ``weights`` (rational approximation, denominators ≤ 1000)."""
    if len(weights) == 0:
        raise ValueError("at least one weight is needed")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    total = sum(weights)
    fracs = [Fraction(w / total).limit_denominator(_MAX_DENOMINATOR) for w in weights]
    # A tiny positive weight must not round to "never scheduled": the user asked for that source.
    fracs = [f if f > 0 or w == 0 else Fraction(1, _MAX_DENOMINATOR) for f, w in zip(fracs, weights)]
    lcm = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * lcm) for f in fracs]
    g = math.gcd(*ints)
    return [i // g for i in ints]


def _smooth_weighted_round_robin(q: Sequence[int]) -> np.ndarray:
    """One period of nginx's smooth weighted round-robin: equal weights give 0,1,...,n-1 and
    unequal ones interleave as evenly as possible (no source waits longer than it must)."""
    total = sum(q)
    current = [0] * len(q)
    out = np.empty(total, dtype=np.int64)
    for t in range(total):
        for s, w in enumerate(q):
            current[s] += w
        best = max(range(len(q)), key=lambda s: (current[s], -s))
        current[best] -= total
        out[t] = best
    return out


class SourceSchedule:
    """Deterministic assignment of schedule units (micro-batches or samples) to sources.

    Args:
        weights: relative frequency of each source (indices into the train source list).
        kind: ``"round_robin"``: a fixed interleaving, identical every period; with equal weights
            any ``n`` consecutive units are ``n`` distinct sources, so a Nexus window of
            ``K >= n`` micro-batches always covers every source. ``"weighted"``: each period is
            a fresh random permutation (seeded by ``(seed, period index)``) of the same multiset.
        seed: only used by ``"weighted"``.

    Example::

        >>> s = SourceSchedule([1, 1, 2], "round_robin")
        >>> s.sources(0, 8).tolist()
        [2, 0, 1, 2, 2, 0, 1, 2]
        >>> s.counts_before(8).tolist()
        [2, 2, 4]
    """

    def __init__(self, weights: Sequence[float], kind: ScheduleKind = "round_robin", seed: int = 0) -> None:
        if kind not in ("round_robin", "weighted"):
            raise ValueError(f"schedule must be 'round_robin' or 'weighted', got {kind!r}")
        self.kind = kind
        self.seed = int(seed)
        self.q = np.asarray(integer_weights(weights), dtype=np.int64)
        self.period = int(self.q.sum())
        self._base = _smooth_weighted_round_robin(self.q.tolist())
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def num_sources(self) -> int:
        return len(self.q)

    def _period(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Period ``p``'s sequence and its per-source prefix counts (shape [P + 1, n])."""
        if self._cache is not None and self._cache[0] == p:
            return self._cache[1], self._cache[2]
        if self.kind == "round_robin":
            seq = self._base
        else:
            rng = np.random.default_rng([self.seed, p, 0x5EED])
            seq = self._base[rng.permutation(self.period)]
        onehot = np.zeros((self.period + 1, self.num_sources), dtype=np.int64)
        onehot[np.arange(1, self.period + 1), seq] = 1
        prefix = np.cumsum(onehot, axis=0)
        self._cache = (p, seq, prefix)
        return seq, prefix

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Source index of every unit in ``[start, stop)``."""
        if start < 0 or stop < start:
            raise ValueError(f"bad range [{start}, {stop})")
        out = np.empty(stop - start, dtype=np.int64)
        i = start
        while i < stop:
            p, off = divmod(i, self.period)
            seq, _ = self._period(p)
            take = min(self.period - off, stop - i)
            out[i - start : i - start + take] = seq[off : off + take]
            i += take
        return out

    def counts_before(self, index: int) -> np.ndarray:
        """How many units of each source come before ``index`` (exclusive)."""
        p, off = divmod(index, self.period)
        _, prefix = self._period(p)
        return p * self.q + prefix[off]
