"""Alternating A/B measurement shared by the benchmarks.

Arms (callables that run one fit and return its :class:`Measurement`) run in turns, warm-up rounds first
and discarded, then ``repeats`` timed rounds. Two things keep a small difference between arms readable on
a machine whose load drifts:

* Rounds alternate the order (A B, then B A, ...): an arm that always ran second would always inherit
  the other's allocator, cache and clock state; balanced order spreads that over both.
* Ratios come with the spread of the *paired* per-round ratios (arms of one round ran seconds apart, so
  load drift largely cancels in them), next to the ratio of medians that matches the reported rates.

Used by ``python -m benchmarks.overhead_cpu``, ``python -m benchmarks.monitor_overhead_cpu`` and
``python -m benchmarks.throughput``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning.pytorch as pl

T = TypeVar("T")


@dataclass(frozen=True)
class Measurement:
    """One timed span of one arm."""

    wall_s: float
    """Wall-clock seconds of the span."""
    cpu_s: float
    """CPU seconds this process spent in the span (all threads): far less sensitive to other jobs on a
    shared CPU machine than wall time; on a GPU it is mostly host-side launch and wait time."""
    work: float = 1.0
    """Units of work done in the span (tokens, steps), so rates are work per second."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Anything else the arm reports (peak memory, last loss, ...)."""

    @property
    def wall_rate(self) -> float:
        return self.work / self.wall_s

    @property
    def cpu_rate(self) -> float:
        return self.work / self.cpu_s


class Stopwatch:
    """Wall and process-CPU time of a span.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called at both ends, so device work queued before the
    start is outside the span and device work queued inside it is inside, however asynchronous the
    launches are.

    Example::

        >>> watch = Stopwatch()
        >>> watch.start()
        >>> wall, cpu = watch.stop()
        >>> wall >= 0 and cpu >= 0
        True
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self._wall: float | None = None
        self._cpu: float | None = None

    @property
    def running(self) -> bool:
        return self._wall is not None

    def start(self) -> None:
        if self._sync is not None:
            self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) since :meth:`start`."""
        if self._wall is None or self._cpu is None:
            raise RuntimeError("Stopwatch.stop() before start()")
        if self._sync is not None:
            self._sync()
        wall, cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        self._wall = self._cpu = None
        return wall, cpu


def alternate(
    arms: Mapping[str, Callable[[], T]],
    repeats: int,
    warmup: int = 1,
    on_result: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run every arm once per round, ``warmup`` discarded rounds then ``repeats`` kept ones.

    Even rounds run the arms in the given order, odd rounds in reverse (A B | B A | A B ...).
    ``on_result(round, arm, result)`` is called after every run, warm-up rounds included (round < 0),
    e.g. to print progress. Returns the kept results per arm, in round order.

    Example::

        >>> order = []
        >>> runs = alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1)
        >>> order, len(runs["a"])
        (['a', 'b', 'b', 'a', 'a', 'b'], 2)
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    names = list(arms)
    kept: dict[str, list[T]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        for name in names if index % 2 == 0 else reversed(names):
            result = arms[name]()
            if on_result is not None:
                on_result(index - warmup, name, result)
            if index >= warmup:
                kept[name].append(result)
    return kept


@dataclass(frozen=True)
class Spread:
    """Median and range of a few repeated values."""

    median: float
    low: float
    high: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread() of no values")
    return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two arms' repeated values."""

    value: float
    """median(numerator) / median(denominator): the ratio of the figures a report prints."""
    paired: Spread
    """Per-round ratios numerator[i] / denominator[i] (the arms of one round ran back to back)."""


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Ratio:
    """Ratio of two arms' values from :func:`alternate` (same number of rounds).

    Example::

        >>> r = ratio([9.0, 10.0, 11.0], [10.0, 10.0, 10.0])
        >>> round(r.value, 3), round(r.paired.low, 3), round(r.paired.high, 3)
        (1.0, 0.9, 1.1)
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"ratio() of {len(numerator)} and {len(denominator)} values: pair them by round")
    value = statistics.median(numerator) / statistics.median(denominator)
    return Ratio(value, spread([a / b for a, b in zip(numerator, denominator)]))


class NullLogger(pl.loggers.Logger):
    """Makes Lightning (and callbacks that log only on steps Lightning writes) do their logging work
    without writing files, so a benchmark pays what a logged run pays."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass


def overhead_main(
    benchmark: str, description: str | None, loop: Callable[[bool, Any], Measurement], labels: tuple[str, str]
) -> None:
    """The CLI of the CPU overhead benchmarks on the quickstart's tiny GPT: ``loop(nexus, args)`` times one
    arm; the arms alternate, and a line plus a JSON record report the Nexus/plain ratio per wall and CPU second."""
    import argparse
    import json
    import os

    import torch

    from lightning_nexus_recipes.models import GPT, GPTConfig

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="outer steps per timed loop")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per arm (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    runs = alternate({"plain": lambda: loop(False, args), "nexus": lambda: loop(True, args)}, args.repeats, warmup=1)
    wall_rates = {arm: [m.wall_rate for m in runs[arm]] for arm in runs}
    cpu_rates = {arm: [m.cpu_rate for m in runs[arm]] for arm in runs}
    wall = {arm: spread(rates).median for arm, rates in wall_rates.items()}
    wall_ratio = ratio(wall_rates["nexus"], wall_rates["plain"])
    cpu_ratio = ratio(cpu_rates["nexus"], cpu_rates["plain"])
    record = {
        "benchmark": benchmark,
        "model": "recipes GPT tiny (quickstart)",
        "params": sum(p.numel() for p in GPT(GPTConfig(size="tiny")).parameters()),
        "shape": f"{args.batch_size}x{args.block}, K={args.accumulate}",
        "tokens_per_s_plain": round(wall["plain"]),
        "tokens_per_s_nexus": round(wall["nexus"]),
        "ratio_nexus_over_plain": round(wall_ratio.value, 4),
        "ratio_nexus_over_plain_range": [round(wall_ratio.paired.low, 4), round(wall_ratio.paired.high, 4)],
        "ratio_nexus_over_plain_cpu_time": round(cpu_ratio.value, 4),
        "ratio_nexus_over_plain_cpu_time_range": [round(cpu_ratio.paired.low, 4), round(cpu_ratio.paired.high, 4)],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    print(
        f"{labels[0]} {wall['plain']:,.0f} tokens/s, {labels[1]} {wall['nexus']:,.0f} tokens/s: ratio "
        f"{wall_ratio.value:.3f}, per round {wall_ratio.paired.low:.3f}-{wall_ratio.paired.high:.3f} (per CPU second "
        f"{cpu_ratio.value:.3f}, per round {cpu_ratio.paired.low:.3f}-{cpu_ratio.paired.high:.3f}; "
        f"load average {record['load_average_1min']})"
    )
    print(json.dumps(record))
