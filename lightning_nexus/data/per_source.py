"""``per_source_dataloader``: one-source micro-batches from the user's own datasets, for any LightningModule.

The batch sequence is the one ``MixedSourceDataModule`` uses, as a pure function of
``(seed, global batch index, rank, world size)``:

1. ``SourceSchedule`` maps global batch ``g`` to a source ``s``: the same on every rank.
2. The ``c``-th batch of source ``s`` takes sample positions ``(c * world + rank) * B + b``: disjoint
   across ranks, consecutive batches never overlap.
3. A position maps through a per-source permutation of the source's samples (seeded by
   ``(seed, source, pass)``, re-drawn each time the source is used up) to a sample index.

So any DataLoader worker, rank or resumed run computes the same batches; ``state_dict()`` needs only
the epoch and the number of batches delivered. The loader iterates an ``IterableDataset`` of whole
batches, which also keeps Lightning from swapping in a ``DistributedSampler`` (ranks are handled
here). Every batch is full; by default an epoch ends before the first source would repeat a sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from lightning_nexus.data.schedule import ScheduleKind, SourceSchedule

__all__ = ["PerSourceDataLoader", "per_source_dataloader"]

_REFUSED_KWARGS = ("shuffle", "sampler", "batch_sampler", "drop_last")


def _dist_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if initialized else 1)
    r = rank if rank is not None else (torch.distributed.get_rank() if initialized else 0)
    if not isinstance(world, int) or world < 1 or not isinstance(r, int) or not 0 <= r < world:
        raise ValueError(f"need 0 <= rank < num_replicas, got rank={r!r}, num_replicas={world!r}")
    return world, r


def _tag(item: Any, source_id: int) -> Any:
    if isinstance(item, Mapping):
        return {**item, "source_id": source_id}
    return item


class _Positions:
    """Sample position -> sample index of one source, through seeded per-pass permutations."""

    def __init__(self, n: int, seed: int, source: int) -> None:
        self.n, self.seed, self.source = n, seed, source
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, positions: np.ndarray) -> list[int]:
        out = []
        for pos in positions.tolist():
            p, off = divmod(pos, self.n)
            if self._perm is None or self._perm[0] != p:
                rng = np.random.default_rng([self.seed, self.source, p, 0x5A3])
                self._perm = (p, rng.permutation(self.n))
            out.append(int(self._perm[1][off]))
        return out


class _Batches(IterableDataset):
    """Global batches ``[start, stop)`` of one rank over map-style sources; worker ``w`` of ``n``
    builds every ``n``-th batch, which is the order in which DataLoader collects them."""

    def __init__(
        self,
        datasets: Sequence[Dataset],
        batch_size: int,
        schedule: SourceSchedule,
        seed: int,
        rank: int,
        world: int,
        collate_fn: Callable[[list[Any]], Any],
        length: int | None = None,
    ) -> None:
        self.datasets, self.batch_size, self.schedule = list(datasets), batch_size, schedule
        self.rank, self.world, self.collate_fn = rank, world, collate_fn
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        self.positions = [_Positions(n, seed, s) for s, n in enumerate(self.sizes)]
        self.length = self._epoch_length() if length is None else length
        self.start, self.stop = 0, self.length

    def _epoch_length(self) -> int:
        # the longest epoch in which no source repeats a sample (each batch uses B * world of them)
        per_batch = self.batch_size * self.world
        n, q, period = np.asarray(self.sizes), self.schedule.q, self.schedule.period
        length = max(1, int(min(n * period // (per_batch * q))))
        while length > 1 and np.any(self.schedule.counts_before(length) * per_batch > n):
            length -= 1  # the last, partial period may hold more of a source than its average
        return length

    def source_of(self, index: int) -> int:
        return int(self.schedule.sources(index, index + 1)[0])

    def indices(self, index: int) -> tuple[int, list[int]]:
        """(source, sample indices within it) of global batch ``index`` on this rank."""
        s = self.source_of(index)
        c = int(self.schedule.counts_before(index)[s])
        pos = (c * self.world + self.rank) * self.batch_size + np.arange(self.batch_size)
        return s, self.positions[s](pos)

    def batch(self, index: int) -> Any:
        s, idx = self.indices(index)
        ds = self.datasets[s]
        getitems = getattr(ds, "__getitems__", None)  # Hugging Face datasets fetch a list in one call
        items = getitems(idx) if callable(getitems) else [ds[i] for i in idx]
        return self.collate_fn([_tag(item, s) for item in items])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(self.start + wid, self.stop, nw):
            yield self.batch(i)

    def __len__(self) -> int:
        return self.length


class _StreamBatches(IterableDataset):
    """Global batches ``[start, stop)`` over iterable (streaming) sources, read in the main process.

    Each use of a source reads ``B * world`` items from it and keeps this rank's ``B``: disjoint
    across ranks, at the price of every rank reading every item. A source that runs out starts
    its next pass (``iter`` again). The sources' iterators live on across epochs; when the batch
    index does not continue where they stand (a resumed run), they are re-created and the items
    consumed before ``start`` are read and dropped, so the stream continues exactly.
    """

    def __init__(
        self,
        datasets: Sequence[IterableDataset],
        names: Sequence[str],
        batch_size: int,
        schedule: SourceSchedule,
        length: int,
        rank: int,
        world: int,
        collate_fn: Callable[[list[Any]], Any],
    ) -> None:
        self.datasets, self.names, self.batch_size, self.schedule = list(datasets), list(names), batch_size, schedule
        self.length, self.rank, self.world, self.collate_fn = length, rank, world, collate_fn
        self.start, self.stop = 0, length
        self._its: list[Iterator[Any]] | None = None
        self._at = -1  # global batch index the live iterators stand at

    def __len__(self) -> int:
        return self.length

    def source_of(self, index: int) -> int:
        return int(self.schedule.sources(index, index + 1)[0])

    def _next(self, s: int) -> Any:
        assert self._its is not None
        item = next(self._its[s], _END)
        if item is _END:  # next pass over the source
            self._its[s] = iter(self.datasets[s])
            item = next(self._its[s], _END)
            if item is _END:
                raise ValueError(f"source '{self.names[s]}' yields no items")
        return item

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "per_source_dataloader over iterable datasets reads them in the main process: num_workers=0"
            )
        per_use = self.batch_size * self.world
        if self._its is None or self._at != self.start:
            self._its = [iter(d) for d in self.datasets]
            for s, n in enumerate((self.schedule.counts_before(self.start) * per_use).tolist()):
                for _ in range(n):
                    self._next(s)
            self._at = self.start
        for g in range(self.start, self.stop):
            s = self.source_of(g)
            chunk = [self._next(s) for _ in range(per_use)]
            self._at = g + 1
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield self.collate_fn([_tag(x, s) for x in mine])


_END = object()


class PerSourceDataLoader(DataLoader):
    """A DataLoader whose every batch comes from one of ``source_names``; resumable (``_Stateful``).

    ``state_dict()`` / ``load_state_dict()`` record the epoch and the batches delivered in it;
    Lightning's fit loop saves them in checkpoints (``loops.fit_loop._FitLoop.on_save_checkpoint``
    stores the ``state_dict`` of every stateful train dataloader) and restores them before the
    resumed epoch starts. The epoch is an own counter that advances after each complete pass
    (``set_epoch`` sets it), so each epoch draws a new order.
    """

    def __init__(self, batches: _Batches | _StreamBatches, source_names: list[str], **kwargs: Any) -> None:
        super().__init__(batches, batch_size=None, **kwargs)
        self.batches = batches
        self.source_names = list(source_names)
        self._epoch, self._yielded = 0, 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (from its first batch)."""
        self._epoch, self._yielded, self._resume = int(epoch), 0, None

    def __len__(self) -> int:
        return len(self.batches)

    def source_of_batch(self, index: int, epoch: int | None = None) -> str:
        """Name of the source of batch ``index`` of ``epoch`` (default: the current one); same on every rank."""
        ds = self.batches
        e = self._epoch if epoch is None else epoch
        return self.source_names[ds.source_of(e * ds.length + index)]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self._epoch
        skip = 0
        if self._resume is not None:
            skip = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        ds = self.batches
        ds.start, ds.stop = epoch * ds.length + skip, (epoch + 1) * ds.length
        self._epoch, self._yielded = epoch, skip
        return self._counting(super().__iter__())

    def _counting(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._yielded += 1
            yield batch
        self._epoch += 1
        self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._yielded = int(state["epoch"]), int(state["batches"])
        self._resume = (self._epoch, self._yielded)


def per_source_dataloader(
    datasets: Mapping[str, Dataset],
    batch_size: int,
    *,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    schedule: ScheduleKind = "weighted",
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    batches_per_epoch: int | None = None,
    **dataloader_kwargs: Any,
) -> PerSourceDataLoader:
    """A DataLoader over several datasets in which every batch comes from exactly one of them.

    Args:
        datasets: name -> dataset, in the order of ``loader.source_names``. Map-style torch datasets
            and Hugging Face ``datasets.Dataset`` objects; or all iterable (streaming) datasets,
            read in the main process (``num_workers=0``; needs ``batches_per_epoch``).
        batch_size: samples per batch (per rank).
        weights: relative share of batches per source (a sequence in mapping order, or a mapping
            by name); default equal. Every weight must be > 0.
        schedule: ``round_robin`` (fixed interleaving: with equal weights any ``K`` consecutive batches
            are the ``K`` sources) or ``weighted`` (a fresh random order every period, weights exact over
            each period), as in ``MixedSourceDataModule``.
        seed: seeds the schedule and the sample order; use the same on every rank.
        num_replicas, rank: data-parallel world size and rank; default: the initialized process group
            (else 1 and 0). Every rank gets the same source at batch ``i`` and disjoint samples.
        batches_per_epoch: length of an epoch in batches. Map-style sources default to the longest
            epoch in which no source repeats a sample; iterable sources need it (they have no length;
            a source that runs out starts its next pass).
        dataloader_kwargs: passed to ``DataLoader`` (``num_workers``, ``collate_fn``, ``pin_memory``...);
            ``shuffle``, ``sampler``, ``batch_sampler`` and ``drop_last`` are decided here.

    Dict items get ``"source_id"`` (index into ``loader.source_names``), so a default-collated batch
    carries a ``[B]`` tensor of it.

    Example::

        >>> import torch
        >>> from lightning_nexus.data import per_source_dataloader
        >>> ds = {"a": [{"x": torch.tensor(i)} for i in range(8)], "b": [{"x": torch.tensor(100 + i)} for i in range(8)]}
        >>> loader = per_source_dataloader(ds, batch_size=2, schedule="round_robin")
        >>> [loader.source_names[int(b["source_id"][0])] for b in loader][:4]
        ['a', 'b', 'a', 'b']
    """
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty mapping of source name -> dataset")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for key in _REFUSED_KWARGS:
        if key in dataloader_kwargs:
            raise ValueError(f"per_source_dataloader decides {key!r} itself (one source per batch); remove it")
    if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch < 1):
        raise ValueError(f"batches_per_epoch must be an integer >= 1, got {batches_per_epoch!r}")
    names = [str(n) for n in datasets]
    w = _weights(names, weights)
    sched = SourceSchedule(w, schedule, seed)
    world, r = _dist_default(num_replicas, rank)
    collate = dataloader_kwargs.pop("collate_fn", None) or default_collate
    values = list(datasets.values())
    iterable = [isinstance(d, IterableDataset) for d in values]
    if all(iterable):
        if dataloader_kwargs.get("num_workers", 0):
            raise ValueError(
                "per_source_dataloader over iterable datasets reads them in the main process: num_workers=0"
            )
        if batches_per_epoch is None:
            raise ValueError(
                "iterable datasets have no length: pass batches_per_epoch=N (sources that run out start over)"
            )
        streams = [d for d in values if isinstance(d, IterableDataset)]
        batches: _Batches | _StreamBatches = _StreamBatches(
            streams, names, batch_size, sched, batches_per_epoch, r, world, collate
        )
    elif any(iterable):
        raise ValueError(
            f"sources {[n for n, it in zip(names, iterable) if it]} are iterable and the others map-style; "
            "give all of one kind"
        )
    else:
        for n, d in zip(names, values):
            if not hasattr(d, "__len__") or len(d) < batch_size * world:
                size = len(d) if hasattr(d, "__len__") else "no"
                raise ValueError(
                    f"source '{n}' has {size} samples, fewer than one batch of {batch_size} on each of {world} "
                    "rank(s); lower batch_size or add data"
                )
        batches = _Batches(values, batch_size, sched, seed, r, world, collate, batches_per_epoch)
    return PerSourceDataLoader(batches, names, **dataloader_kwargs)


def _weights(names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"weights name {sorted(weights)} but the sources are {names}; give one weight per source")
        w = [float(weights[n]) for n in names]
    else:
        w = [float(x) for x in weights]
        if len(w) != len(names):
            raise ValueError(f"{len(w)} weights for {len(names)} sources {names}; give one weight per source")
    for n, x in zip(names, w):
        if not np.isfinite(x) or x <= 0:
            raise ValueError(f"source '{n}': weight {x!r} must be a finite number > 0 (remove the source instead)")
    return w
