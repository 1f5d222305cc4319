"""The declared interface between :class:`~lightning_nexus.NexusCallback` and the strategies it runs under.

A strategy that implements :class:`NexusStrategy` tells the callback two things the stock strategies
cannot: over which process group its parameter shards lie (for the global norm of each micro-batch's
gradient) and how the ranks agree on a window's pseudo-gradient. The callback refuses the stock DDP
(world size > 1) and FSDP1 strategies because they implement neither. In the other direction, a strategy
that gathers weights itself (FSDP1's state dict) asks every :class:`WindowOwner` callback to hold θ0 in
the parameters meanwhile, so a mid-window checkpoint stores θ0.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch.distributed as dist
from torch import Tensor


@runtime_checkable
class NexusStrategy(Protocol):
    """A Lightning strategy that keeps every rank's parameters identical under Nexus."""

    def nexus_shard_group(self, params: list[Tensor]) -> dist.ProcessGroup | None:
        """The group over which the plain-tensor shards of ``params`` are spread (None: whole tensors,
        or DTensors, which carry their own placements)."""
        ...

    def reduce_window(self, params: list[Tensor], skipped: bool) -> bool:
        """Called on every rank right after the window's pseudo-gradient G is in ``.grad``: make G agree
        across ranks if it does not already, and return whether any rank skipped the window."""
        ...


@runtime_checkable
class WindowOwner(Protocol):
    """A callback that runs Nexus windows (``NexusCallback``)."""

    def anchor_as_weights(self) -> AbstractContextManager[None]:
        """While entered, the parameters hold θ0 (a no-op outside a window)."""
        ...
