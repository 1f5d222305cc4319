"""``MixedSourceDataModule``: one data source per micro-batch, identical on every rank, resumable.

How a train batch is chosen (all of it a pure function of ``(seed, global micro-batch index,
rank, world size)``, so any worker, any rank and any resumed run computes the same thing):

1. ``SourceSchedule`` maps the global micro-batch index (``mixing="per_source"``) or the global
   sample-slot index (``mixing="sample"``) to a source: the same on every rank.
2. The ``c``-th use of source ``s`` takes sample positions ``(c * world + rank) * B + b``: disjoint
   across ranks, consecutive uses never overlap.
3. A position maps through a per-source permutation of its packed blocks (seeded by
   ``(seed, source, pass)``, re-drawn each time the source is exhausted) to ``block_size + 1``
   contiguous tokens, so ``labels`` are ``input_ids`` shifted by one.

Resuming: the train loader is ``_Stateful`` for Lightning; it records how many batches it handed to
the loop in the current epoch and, after a restore, starts the epoch that many batches later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_nexus.data.corpus import DEFAULT_BYTES_PER_SOURCE, build_embedded_corpus, default_cache_dir
from lightning_nexus.data.schedule import ScheduleKind, SourceSchedule
from lightning_nexus.data.sources import (
    PRETOKENIZED_FORMATS,
    SourceError,
    SourceSpec,
    check_source_data,
    resolve_source,
    source_record,
    train_user_bpe,
    validate_specs,
)
from lightning_nexus.data.store import TokenStream
from lightning_nexus.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerRecord,
    record_of,
)

Batch = dict[str, torch.Tensor]


class _BlockPicker:
    """Sample position -> packed block index of one source, through seeded per-pass permutations."""

    def __init__(self, n_blocks: int, seed: int, source_key: int) -> None:
        self.n = n_blocks
        self.seed = seed
        self.key = source_key
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=np.int64)
        for j, pos in enumerate(positions):
            p, off = divmod(int(pos), self.n)
            if self._perm is None or self._perm[0] != p:
                rng = np.random.default_rng([self.seed, self.key, p, 0xB10C])
                self._perm = (p, rng.permutation(self.n))
            out[j] = self._perm[1][off]
        return out


class _TrainBatches(IterableDataset):
    """Global micro-batches ``[start, stop)`` of one rank; DataLoader workers take every
    ``num_workers``-th index, which is exactly the order in which DataLoader collects them."""

    def __init__(
        self,
        streams: list[TokenStream],
        source_ids: list[int],
        n_blocks: list[int],
        block_size: int,
        batch_size: int,
        schedule: SourceSchedule,
        mixing: str,
        seed: int,
        rank: int,
        world_size: int,
        length: int,
    ) -> None:
        self.streams, self.source_ids = streams, source_ids
        self.seq = block_size + 1
        self.batch_size, self.schedule, self.mixing = batch_size, schedule, mixing
        self.rank, self.world = rank, world_size
        self.length = length
        self.pickers = [_BlockPicker(n, seed, sid) for n, sid in zip(n_blocks, source_ids)]
        self.start, self.stop = 0, length
        self.sid_map = np.asarray(source_ids, dtype=np.int64)
        self.dtype = np.result_type(*[st.dtype for st in streams])

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[RawBatch]:
        # Workers yield compact numpy arrays (uint8 for bytes), not tensors: small tensors cross
        # the worker boundary through one shared-memory file each, which measured ~10x slower
        # than pickling the arrays through the pipe. ``to_batch`` runs in the main process.
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(self.start + wid, self.stop, nw):
            yield self.raw(i)

    def slot_sources(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(schedule source per slot, sample position per slot) of global micro-batch ``index``."""
        B, W = self.batch_size, self.world
        if self.mixing == "per_source":
            s = int(self.schedule.sources(index, index + 1)[0])
            c = int(self.schedule.counts_before(index)[s])
            return np.full(B, s), (c * W + self.rank) * B + np.arange(B)
        srcs = self.schedule.sources(index * B, (index + 1) * B)
        counts = self.schedule.counts_before(index * B).copy()
        pos = np.empty(B, dtype=np.int64)
        for b, s in enumerate(srcs):
            pos[b] = counts[s] * W + self.rank
            counts[s] += 1
        return srcs, pos

    def raw(self, index: int) -> RawBatch:
        """Tokens ``[B, block_size + 1]`` (storage dtype) and per-row source ids of micro-batch ``index``."""
        srcs, pos = self.slot_sources(index)
        buf = np.empty((self.batch_size, self.seq), dtype=self.dtype)
        for s in np.unique(srcs):
            rows = np.nonzero(srcs == s)[0]
            blocks = self.pickers[s](pos[rows])
            for r, blk in zip(rows, blocks):
                self.streams[s].read(int(blk) * self.seq, self.seq, buf[r])
        return buf, self.sid_map[srcs]

    def batch(self, index: int) -> Batch:
        return to_batch(self.raw(index))


RawBatch = tuple[np.ndarray, np.ndarray]


def to_batch(raw: RawBatch) -> Batch:
    tokens, sids = raw
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    return {
        "input_ids": t[:, :-1].contiguous(),
        "labels": t[:, 1:].contiguous(),
        "source_id": torch.from_numpy(np.asarray(sids, dtype=np.int64)),
    }


def _no_collate(x: Any) -> Any:  # the dataset yields whole batches (RawBatch): nothing to collate
    return x


class _ValBatches(IterableDataset):
    """Fixed held-out blocks of one source, batch ``j`` on rank ``j % world``."""

    def __init__(
        self,
        stream: TokenStream,
        source_id: int,
        first_token: int,
        n_batches: int,
        block_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.stream, self.source_id, self.first = stream, source_id, first_token
        self.seq, self.batch_size = block_size + 1, batch_size
        self.indices = list(range(rank, n_batches, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        for j in self.indices:
            buf = np.empty((self.batch_size, self.seq), dtype=np.int64)
            for b in range(self.batch_size):
                self.stream.read(self.first + (j * self.batch_size + b) * self.seq, self.seq, buf[b])
            t = torch.from_numpy(buf)
            yield {
                "input_ids": t[:, :-1].contiguous(),
                "labels": t[:, 1:].contiguous(),
                "source_id": torch.full((self.batch_size,), self.source_id, dtype=torch.long),
            }


class _ResumableLoader(DataLoader):
    """A DataLoader over ``_TrainBatches`` that Lightning saves and restores (``_Stateful``).

    The epoch comes from ``epoch_fn`` (the trainer's epoch) when it returns one, otherwise from
    an own counter that advances after each complete pass, so plain loops get new data each epoch.
    """

    def __init__(
        self, dataset: _TrainBatches, num_workers: int, epoch_fn: Callable[[], int | None], **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_no_collate, **kwargs)
        self._epoch_fn = epoch_fn
        self._own_epoch = 0
        self._epoch = 0
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # _TrainBatches is sized

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]  # yields batches, as a DataLoader's iterator does
        epoch = self._epoch_fn()
        epoch = self._own_epoch if epoch is None else epoch
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                skip = self._resume["batches"]
            else:
                self._resume = None
        ds: _TrainBatches = self.dataset  # type: ignore[assignment]
        ds.start, ds.stop = epoch * ds.length + skip, (epoch + 1) * ds.length
        self._epoch, self._yielded = epoch, skip
        return self._counting(super().__iter__())

    def _counting(self, it: Iterator[RawBatch]) -> Iterator[Batch]:
        for raw in it:
            self._yielded += 1
            yield to_batch(raw)
        self._resume = None
        self._own_epoch = self._epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        self._epoch, self._yielded, self._own_epoch = (
            self._resume["epoch"],
            self._resume["batches"],
            self._resume["epoch"],
        )


class MixedSourceDataModule(LightningDataModule):
    """Packed fixed-length sequences from several sources, one source per micro-batch.

    Every batch is ``{"input_ids": [B, T], "labels": [B, T], "source_id": [B]}`` with ``labels``
    the next tokens and ``source_id`` indexing ``source_names``.

    Args:
        sources: the data sources; ``None`` uses the embedded offline corpus.
        block_size: tokens per sequence ``T``.
        batch_size: sequences per micro-batch, per rank.
        schedule: ``round_robin`` (fixed interleaving: with equal weights any ``n`` consecutive
            micro-batches are the ``n`` train sources) or ``weighted`` (random order, weights exact
            over every period of the schedule).
        mixing: ``per_source`` (Nexus: one source per micro-batch) or ``sample`` (each sample
            from its own source, litgpt-style; the ablation).
        seed: seeds the schedule and the sample order.
        num_workers: DataLoader workers for training (validation reads in the main process).
        cache_dir: where corpora and tokenized sources are kept; default
            ``$LIGHTNING_NEXUS_CACHE`` or ``~/.cache/lightning_nexus``.
        val_batches_per_source: validation micro-batches per source (all ranks together); they
            are cut from the end of each train source's stream and never trained on.
        tokenizer: ``byte`` (vocab 256), ``bpe`` (trained offline with ``tokenizers`` on the train
            sources) or the path of a pretrained Hugging Face ``tokenizer.json``. It tokenizes the
            document sources; pre-tokenized sources state theirs, and all must agree.
        bpe_vocab_size: vocabulary of the BPE tokenizer.
        train_batches_per_epoch: micro-batches per epoch and rank; default: until the first
            source would repeat a block.
        corpus_bytes_per_source: size of each embedded-corpus source.
        vocab_size: vocabulary for the model, if larger than the tokenizer's (never smaller than the
            largest token id of any source).

    Example::

        >>> dm = MixedSourceDataModule(block_size=64, batch_size=4, cache_dir="/tmp/ln-doc-cache",
        ...                            corpus_bytes_per_source=20_000)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape, dm.source_names[int(batch["source_id"][0])]
        (torch.Size([4, 64]), 'code')
    """

    def __init__(
        self,
        sources: list[SourceSpec] | None = None,
        block_size: int = 256,
        batch_size: int = 8,
        schedule: Literal["round_robin", "weighted"] = "round_robin",
        mixing: Literal["per_source", "sample"] = "per_source",
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        val_batches_per_source: int = 8,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        train_batches_per_epoch: int | None = None,
        corpus_bytes_per_source: int = DEFAULT_BYTES_PER_SOURCE,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        for arg, val, lo in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_batches_per_source", val_batches_per_source, 0),
        ):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{arg} must be an integer >= {lo}, got {val!r}")
        if schedule not in ("round_robin", "weighted"):
            raise ValueError(f"schedule must be 'round_robin' or 'weighted', got {schedule!r}")
        if mixing not in ("per_source", "sample"):
            raise ValueError(f"mixing must be 'per_source' or 'sample', got {mixing!r}")
        if tokenizer not in ("byte", "bpe") and not str(tokenizer).endswith(".json"):
            raise ValueError(f"tokenizer must be 'byte', 'bpe' or the path of a tokenizer.json, got {tokenizer!r}")
        if sources is None and tokenizer not in ("byte", "bpe"):
            raise ValueError(
                f"tokenizer={tokenizer!r}: the embedded corpus is tokenized with 'byte' or 'bpe'; a tokenizer.json "
                "needs your own sources"
            )
        if sources is not None:
            sources = [SourceSpec(**s) if isinstance(s, dict) else s for s in sources]
            validate_specs(sources)
        self.sources = sources
        self.block_size, self.batch_size = block_size, batch_size
        self.schedule_kind: ScheduleKind = schedule
        self.mixing, self.seed, self.num_workers = mixing, seed, num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.val_batches_per_source = val_batches_per_source
        self.tokenizer, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.train_batches_per_epoch = train_batches_per_epoch
        self.corpus_bytes_per_source = corpus_bytes_per_source
        self._vocab_override = vocab_size
        self._dist: tuple[int, int] | None = None
        self._resolved: dict[str, Any] | None = None
        self._train_loader: _ResumableLoader | None = None
        self._records: dict[str, TokenizerRecord] = {}

    # -- resolution ----------------------------------------------------------------------------

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Rank and world size for use outside a Trainer (inside one, the trainer's are used)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self._dist = (rank, world_size)

    def _rank_world(self) -> tuple[int, int]:
        if self._dist is not None:
            return self._dist
        trainer = self._trainer_or_none()
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def prepare_data(self) -> None:
        # Lightning runs this once per node before setup(): build caches here so ranks don't race.
        self._resolve()

    def _resolve(self) -> dict[str, Any]:
        if self._resolved is not None:
            return self._resolved
        entries: list[tuple[str, str, Any, float]]
        tok: Tokenizer
        if self.sources is None:
            kind: Literal["byte", "bpe"] = "bpe" if self.tokenizer == "bpe" else "byte"
            corpus = build_embedded_corpus(
                self.cache_dir, self.corpus_bytes_per_source, kind, self.bpe_vocab_size, seed=0
            )
            entries = [(s.name, s.role, TokenStream(s.path, name=s.name), 1.0) for s in corpus.sources]
            vocab = corpus.vocab_size
            tok = ByteTokenizer() if corpus.tokenizer == "byte" else BPETokenizer(corpus.tokenizer)
        else:
            for spec in self.sources:  # refuse garbage before spending minutes tokenizing it
                check_source_data(spec)
            tok = self._run_tokenizer()
            records = {s.name: source_record(s, tok) for s in self.sources}
            _check_same_tokenizer(self.sources, records)  # before tokenizing: it needs no data
            entries = [(s.name, s.role, resolve_source(s, tok, self.cache_dir), float(s.weight)) for s in self.sources]
            vocab = _check_vocabulary(records, entries, self._vocab_override)
            self._records = records
        if self._vocab_override is not None:
            vocab = max(vocab, self._vocab_override)
        train = [e for e in entries if e[1] == "train"]
        ood = [e for e in entries if e[1] == "ood"]
        self._resolved = {"train": train, "ood": ood, "vocab": vocab, "tokenizer": tok}
        return self._resolved

    def _run_tokenizer(self) -> Tokenizer:
        assert self.sources is not None
        stated = {s.tokenizer for s in self.sources if s.format in PRETOKENIZED_FORMATS}
        only_ids = all(s.format in PRETOKENIZED_FORMATS for s in self.sources)
        if only_ids and self.tokenizer == "byte" and len(stated) == 1 and str(next(iter(stated))).endswith(".json"):
            # nothing to tokenize: the ids' own tokenizer is the run's (text_tokenizer encodes probes with it)
            return HFTokenizer(str(next(iter(stated))))
        if self.tokenizer == "bpe":
            return train_user_bpe(self.sources, self.cache_dir, self.bpe_vocab_size)
        if self.tokenizer == "byte":
            return ByteTokenizer()
        try:
            return HFTokenizer(self.tokenizer)
        except (OSError, ValueError) as err:
            raise SourceError(f"tokenizer {self.tokenizer!r} cannot be used: {err}") from err

    @property
    def max_token_ids(self) -> dict[str, int]:
        """Largest token id of each source (among its first 2**26 tokens): a model's vocabulary must exceed them."""
        res = self._resolve()
        return {name: int(stream.max_token()) for name, _, stream, _ in res["train"] + res["ood"]}

    @property
    def source_tokenizers(self) -> dict[str, TokenizerRecord]:
        """The tokenizer each source's ids come from (all equal: a run with differing ones is refused)."""
        res = self._resolve()
        if self.sources is None:
            return {e[0]: record_of(res["tokenizer"]) for e in res["train"] + res["ood"]}
        return dict(self._records)

    @property
    def text_tokenizer(self) -> ByteTokenizer | BPETokenizer:
        """The tokenizer that produced the token streams (for probes that encode new text)."""
        return self._resolve()["tokenizer"]

    @property
    def train_source_names(self) -> list[str]:
        return [e[0] for e in self._resolve()["train"]]

    @property
    def ood_source_names(self) -> list[str]:
        return [e[0] for e in self._resolve()["ood"]]

    @property
    def source_names(self) -> list[str]:
        return self.train_source_names + self.ood_source_names

    @property
    def val_source_names(self) -> list[str]:
        return self.source_names if self.val_batches_per_source > 0 else []

    @property
    def vocab_size(self) -> int:
        pretokenized = self.sources is not None and any(s.format in PRETOKENIZED_FORMATS for s in self.sources)
        if self.tokenizer == "byte" and self._vocab_override is None and not pretokenized:
            return 256  # known without touching data, so a CLI can link it into the model early
        return int(self._resolve()["vocab"])

    # -- geometry ------------------------------------------------------------------------------

    def _val_tokens(self) -> int:
        return self.val_batches_per_source * self.batch_size * (self.block_size + 1)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the sources and check that every one can fill the requested blocks."""
        res = self._resolve()
        seq = self.block_size + 1
        _, world = self._rank_world()
        for name, role, stream, weight in res["train"] + res["ood"]:
            if stream.num_tokens < seq:
                raise SourceError(
                    f"source '{name}' has {stream.num_tokens} tokens, fewer than one block of block_size+1={seq}; "
                    "lower block_size or add data to the source"
                )
            if role == "train" and weight > 0:
                train_blocks = (stream.num_tokens - self._val_tokens()) // seq
                need = self.batch_size * world
                if train_blocks < need:
                    raise SourceError(
                        f"source '{name}' has {stream.num_tokens} tokens: after holding out val_batches_per_source="
                        f"{self.val_batches_per_source} batches it cannot fill one micro-batch of {need} blocks of "
                        f"{seq} tokens on {world} rank(s); lower block_size, batch_size or val_batches_per_source, or add data"
                    )

    def _train_geometry(self) -> tuple[list, list[int], list[int], SourceSchedule]:
        res = self._resolve()
        seq = self.block_size + 1
        active = [(i, e) for i, e in enumerate(res["train"]) if e[3] > 0]
        n_blocks = [(e[2].num_tokens - self._val_tokens()) // seq for _, e in active]
        sched = SourceSchedule([e[3] for _, e in active], self.schedule_kind, self.seed)
        return active, n_blocks, [i for i, _ in active], sched

    def _epoch_length(self, n_blocks: list[int], sched: SourceSchedule, world: int) -> int:
        if self.train_batches_per_epoch is not None:
            return int(self.train_batches_per_epoch)
        # Default: the longest first epoch in which no source repeats a block. Each schedule unit
        # consumes `per_unit` blocks of its source (B*W per micro-batch, or W per sample slot).
        per_unit, units = (self.batch_size * world, 1) if self.mixing == "per_source" else (world, self.batch_size)
        n = np.asarray(n_blocks)
        length = max(1, int(min(n * sched.period // (per_unit * sched.q * units))))
        while length > 1 and np.any(sched.counts_before(length * units) * per_unit > n):
            length -= 1  # the last, partial period may hold more of a source than its average
        return length

    # -- dataloaders ---------------------------------------------------------------------------

    def train_dataset(self) -> _TrainBatches:
        """The train batch sequence of this rank (``batch(i)`` for any global micro-batch ``i``)."""
        self.setup("fit")
        rank, world = self._rank_world()
        active, n_blocks, sids, sched = self._train_geometry()
        length = self._epoch_length(n_blocks, sched, world)
        return _TrainBatches(
            [e[2] for _, e in active],
            sids,
            n_blocks,
            self.block_size,
            self.batch_size,
            sched,
            self.mixing,
            self.seed,
            rank,
            world,
            length,
        )

    def train_dataloader(self) -> _ResumableLoader:
        def epoch() -> int | None:
            trainer = self._trainer_or_none()
            return None if trainer is None else int(trainer.current_epoch)

        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = 4
        loader = _ResumableLoader(self.train_dataset(), self.num_workers, epoch, **kwargs)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        self.setup("validate")
        res = self._resolve()
        rank, world = self._rank_world()
        seq = self.block_size + 1
        loaders = []
        for sid, (_name, role, stream, _) in enumerate(res["train"] + res["ood"]):
            if role == "train":
                first = stream.num_tokens - self._val_tokens()
                n = self.val_batches_per_source
            else:  # OOD data is never trained on: validate on its beginning, as much as exists
                first = 0
                n = min(self.val_batches_per_source, stream.num_tokens // (seq * self.batch_size))
            ds = _ValBatches(stream, sid, max(first, 0), n, self.block_size, self.batch_size, rank, world)
            loaders.append(DataLoader(ds, batch_size=None, num_workers=0))
        return loaders


def _check_same_tokenizer(specs: list[SourceSpec], records: dict[str, TokenizerRecord]) -> None:
    """Refuse sources whose token ids mean different things."""
    first = specs[0]
    for spec in specs[1:]:
        if not records[spec.name].same_ids(records[first.name]):
            raise SourceError(
                f"sources '{first.name}' and '{spec.name}' use different tokenizers: "
                f"{records[first.name].describe()} vs {records[spec.name].describe()}; their token ids do not mean "
                "the same thing: re-tokenize one of them with the other's tokenizer"
            )


def _check_vocabulary(records: dict[str, TokenizerRecord], entries: list, vocab_override: int | None) -> int:
    """Refuse token ids beyond the vocabulary; return the vocabulary size."""
    vocab = next(iter(records.values())).vocab_size
    tops = {name: int(stream.max_token()) for name, _, stream, _ in entries}
    for name, top in tops.items():
        limit = max(vocab or 0, vocab_override or 0)
        if top >= limit:
            what = f"its tokenizer {records[name].describe()}" if vocab else "the stated vocabulary"
            raise SourceError(
                f"source '{name}' contains token id {top} but {what} has {limit or 'no known'} entries; set "
                f"vocab_size >= {top + 1} if that tokenizer is really larger, or fix the source's tokenizer"
            )
    return max(vocab or 0, vocab_override or 0, 1 + max(tops.values()))
