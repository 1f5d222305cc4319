"""Which data sources the micro-batches of each Nexus window come from, and a warning when that
defeats Nexus.

Nexus averages *normalized per-micro-batch* directions, so it only does something a plain gradient
accumulation does not when each micro-batch is one source and a window holds several sources. Two
ways to lose that silently: micro-batches that mix sources (every direction is an average already),
and windows whose K micro-batches all come from one source (sources ordered in long runs, e.g. a
``ConcatDataset`` read in order). ``WindowSourceCheck`` warns once per run about each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

SINGLE_SOURCE_WINDOWS = 8
"""Consecutive complete windows of one source each, in a run with several sources, before warning."""

_FIX = (
    "make each micro-batch one source and interleave the sources: MixedSourceDataModule(mixing='per_source', "
    "schedule='round_robin') or lightning_nexus.data.per_source_dataloader(..., schedule='round_robin') "
    "in your train_dataloader"
)


def source_names(trainer: Any) -> Sequence[str] | None:
    """The names behind ``batch["source_id"]``: the datamodule's ``source_names``, else the train
    dataloader's (``per_source_dataloader`` sets one), else ``None``."""
    names = getattr(getattr(trainer, "datamodule", None), "source_names", None)
    if names is None:
        try:
            loader = trainer.train_dataloader  # the loader object itself for a single train loader
        except Exception:  # not attached to a fit loop yet
            loader = None
        names = getattr(loader, "source_names", None)
    return list(names) if names is not None else None


class WindowSourceCheck:
    """Looks at ``batch["source_id"]`` of every micro-batch; warns once per run when windows defeat Nexus.

    Batches without a ``source_id`` tensor are not judged (nothing is known about their sources).

    Example::

        >>> import torch
        >>> check = WindowSourceCheck()
        >>> check.observe({"source_id": torch.tensor([0, 1])}, batch_idx=0, k=2, n_sources=2)  # warns
        >>> check.warned_mixed
        True
    """

    def __init__(self) -> None:
        self.warned_mixed = False
        self.warned_single = False
        self._window: list[int] = []
        self._single_run = 0
        self._seen: set[int] = set()

    def observe(self, batch: Any, batch_idx: int, k: int, n_sources: int | None) -> None:
        ids = batch.get("source_id") if isinstance(batch, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            return
        distinct = sorted(set(ids.reshape(-1).tolist()))
        self._seen.update(distinct)
        if len(distinct) > 1:
            self._window = []
            if not self.warned_mixed:
                self.warned_mixed = True
                rank_zero_warn(
                    f"Nexus: micro-batch {batch_idx} mixes data sources {distinct}: Nexus normalizes each "
                    f"micro-batch's gradient, so a mixed micro-batch already averages the sources away; {_FIX}."
                )
            return
        if batch_idx % k == 0:
            self._window = []
        self._window.append(distinct[0])
        if k < 2 or len(self._window) < k:
            return
        self._single_run = self._single_run + 1 if len(set(self._window)) == 1 else 0
        # without names the other sources may only show up later (sources read one after another)
        several = max(n_sources or 0, len(self._seen)) > 1
        if several and self._single_run >= SINGLE_SOURCE_WINDOWS and not self.warned_single:
            self.warned_single = True
            rank_zero_warn(
                f"Nexus: the last {self._single_run} windows each took all {k} micro-batches from a single source "
                f"(source {self._window[0]} in the latest), although the run has several sources: Nexus then "
                f"behaves like normalized gradient accumulation on one source at a time; {_FIX}."
            )
