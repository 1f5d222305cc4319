"""DDP for Nexus: exact (all-reduce every micro-batch) or communication-saving (one all-reduce per window).

Stock DDP under gradient accumulation skips the all-reduce on non-boundary micro-batches, so each
rank would take inner steps from its own gradient and the ranks' parameters drift apart. The two modes:

* ``sync="every"``  all-reduce on every micro-batch: all ranks follow one inner trajectory, the result
  equals one process on the global micro-batch. K gradient all-reduces per window.
* ``sync="window"`` never all-reduce inside the window: every rank follows its own inner trajectory
  and only the pseudo-gradient G is averaged, in flat buckets (DiLoCo-like). One all-reduce per window.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl

_BUCKET_BYTES = 64 * 2**20


class NexusDDPStrategy(DDPStrategy):
    """DDP that keeps ranks identical under :class:`~lightning_nexus.NexusCallback`.

    Args:
        sync: ``"every"`` (exact single-device semantics) or ``"window"`` (K−1 fewer all-reduces;
            each rank takes its own inner steps and the pseudo-gradients are averaged).
        **ddp_kwargs: everything :class:`~lightning.pytorch.strategies.DDPStrategy` accepts.

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, strategy=NexusDDPStrategy(sync="every"),
                          accumulate_grad_batches=4, callbacks=[NexusCallback()])
    """

    supports_nexus = True  # read by NexusCallback's setup check

    def __init__(self, sync: Literal["every", "window"] = "every", **ddp_kwargs: Any) -> None:
        if sync not in ("every", "window"):
            raise ValueError(f"NexusDDPStrategy(sync={sync!r}): expected 'every' or 'window'.")
        super().__init__(**ddp_kwargs)
        self.sync = sync

    @override
    @contextmanager
    def block_backward_sync(self) -> Generator:
        # "every": never block, so DDP all-reduces each micro-batch. "window": sync is switched off for
        # good in configure_ddp (Lightning does not block the boundary micro-batch, which we also need).
        yield None

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        if self.sync == "window":
            self.model.require_backward_grad_sync = False  # type: ignore[union-attr]
        numel = sum(p.numel() for p in self.lightning_module.parameters() if p.requires_grad)
        per_window = "K" if self.sync == "every" else "1"
        rank_zero_info(
            f"NexusDDPStrategy(sync={self.sync!r}): {per_window} all-reduce(s) of {numel * 4 / 2**20:.1f} MiB "
            f"(fp32 gradients, {numel:,} parameters) per window of K micro-batches."
        )

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        if self.sync == "window" and not any(getattr(cb, "nexus_window_reducer", False) for cb in trainer.callbacks):
            raise RuntimeError(
                "NexusDDPStrategy(sync='window') switches DDP's gradient all-reduce off and averages only the "
                "pseudo-gradient that NexusCallback hands over; without NexusCallback the ranks would never "
                "sync. Add NexusCallback, or use sync='every' (or plain 'ddp') for a run without Nexus."
            )
        super().setup(trainer)

    def reduce_window(self, params: list[Tensor], skipped: bool) -> bool:
        """Average the pseudo-gradients in ``.grad`` across ranks (window mode; a no-op in every mode).

        Returns True if any rank skipped its window: then every rank must skip, or they diverge.
        """
        if self.sync != "window" or self.world_size == 1:
            return skipped
        # With backward sync off, DDP also stops broadcasting buffers (BatchNorm statistics) before
        # forward; ask for one broadcast from rank 0 in the next forward, once per window.
        self.model.require_forward_param_sync = True  # type: ignore[union-attr]
        device = params[0].device
        # one flag per parameter (did any rank produce a gradient?) and one for "some rank skipped"
        flags = torch.tensor(
            [0.0 if skipped or p.grad is None else 1.0 for p in params] + [float(skipped)], device=device
        )
        dist.all_reduce(flags)
        if flags[-1].item() > 0:
            return True
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)  # SUM then divide: gloo has no AVG
            flat.div_(self.world_size)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)
        for p, g, got in zip(params, grads, flags[:-1].tolist()):
            p.grad = g if got > 0 else None
        return False


def _buckets(tensors: list[Tensor]) -> Generator[list[Tensor], None, None]:
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > _BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def register_strategies() -> None:
    if "nexus_ddp" in StrategyRegistry:
        return
    StrategyRegistry.register(
        "nexus_ddp", NexusDDPStrategy, description="DDP for Nexus, all-reduce every micro-batch", sync="every"
    )
    StrategyRegistry.register(
        "nexus_ddp_window", NexusDDPStrategy, description="DDP for Nexus, one all-reduce per window", sync="window"
    )
    StrategyRegistry.register(
        "nexus_ddp_spawn", NexusDDPStrategy, description="nexus_ddp with start_method='spawn'", sync="every",
        start_method="spawn",
    )
