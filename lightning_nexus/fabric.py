"""NexusFabric: the Nexus rule in a Lightning Fabric training loop (32-true, bf16-mixed, 16-mixed, DDP).

Fabric leaves the loop to the user, so the two calls below replace ``fabric.backward(loss)`` and the
accumulation boundary's ``clip_gradients`` / ``optimizer.step()`` / ``optimizer.zero_grad()``::

    for k, batch in enumerate(loader):
        nexus.backward(model(batch))            # every micro-batch: its mean loss, not divided by K
        if (k + 1) % K == 0:
            nexus.step(max_norm=1.0)             # every window: θ := θ0, .grad := G, clip, step, zero

How each precision and strategy is made right:

* 16-mixed: ``fabric.backward`` scales the loss by the GradScaler's scale; the core divides it out of the
  inner gradients and writes G back in the scaled domain, so Fabric's ``clip_gradients`` (which unscales)
  and ``optimizer.step()`` (``scaler.step`` + ``scaler.update``) see G. A non-finite window leaves
  ``.grad`` non-finite, so the scaler skips the step and backs its scale off, on every rank.
* DDP ``sync="every"``: DDP all-reduces every micro-batch (never use ``fabric.no_backward_sync`` with it:
  refused), so all ranks follow one inner trajectory, equal to one process on the global micro-batch. The
  core checks during the first window that the ranks' gradients agree.
* DDP ``sync="window"``: DDP's gradient sync is switched off for good; every rank follows its own inner
  trajectory from the shared θ0 and G is averaged once per window in flat buckets
  (:func:`lightning_nexus.replicas.average_pseudo_gradients`, as ``NexusDDPStrategy(sync="window")``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_nexus import _compat
from lightning_nexus.core import Nexus, _local
from lightning_nexus.replicas import average_pseudo_gradients, broadcast_ddp_buffers


class NexusFabric:
    """Run Nexus windows in a Fabric loop: :meth:`backward` once per micro-batch, :meth:`step` once per window.

    Args:
        fabric: the launched :class:`~lightning.fabric.Fabric`.
        model: the module returned by ``fabric.setup`` (or ``fabric.setup_module``).
        optimizer: the outer optimizer returned by ``fabric.setup`` (AdamW, Muon, SGD, ...).
        inner_lr: γ ≥ 0, the inner step length (see :class:`~lightning_nexus.Nexus`).
        normalize: normalized inner directions (Nexus); ``False`` uses raw gradients.
        sync: under DDP, ``"every"`` (exact, K all-reduces per window) or ``"window"`` (one all-reduce of G per
            window). Ignored on one process.

    Example::

        import torch
        from lightning.fabric import Fabric
        from lightning_nexus.fabric import NexusFabric

        fabric = Fabric(accelerator="cpu", devices=1)
        model, optimizer = fabric.setup(net := torch.nn.Linear(4, 1), torch.optim.AdamW(net.parameters(), lr=1e-3))
        nexus = NexusFabric(fabric, model, optimizer, inner_lr=0.05)
        for step in range(3):
            for k in range(4):  # K = 4 micro-batches per window
                nexus.backward(model(torch.randn(8, 4)).pow(2).mean())
            nexus.step(max_norm=1.0)
    """

    def __init__(
        self,
        fabric: Fabric,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inner_lr: float = 0.05,
        normalize: bool = True,
        sync: Literal["every", "window"] = "every",
    ) -> None:
        if sync not in ("every", "window"):
            raise ValueError(f"NexusFabric(sync={sync!r}): expected 'every' or 'window'.")
        forward_module = _compat.fabric_forward_module(model)
        ddp = forward_module if isinstance(forward_module, DistributedDataParallel) else None
        if fabric.world_size > 1 and ddp is None:
            raise RuntimeError(
                f"NexusFabric on {fabric.world_size} processes supports DDP only, but the model runs under "
                f"{type(fabric.strategy).__name__} ({type(forward_module).__name__}): its gradient sync and sharding "
                "are not covered, so ranks could take different inner steps. Use Fabric(strategy='ddp'), or the "
                "Trainer with NexusCallback for FSDP."
            )
        self.fabric = fabric
        self.model = model
        self.optimizer = optimizer
        self.sync = sync
        # the DDP wrapper on several processes (None on one: nothing to sync)
        self._ddp = ddp if fabric.world_size > 1 else None
        if self._ddp is not None and sync == "window":
            self._ddp.require_backward_grad_sync = False  # no sync inside the window, ever: G is averaged instead
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        self._scaler: torch.amp.GradScaler | None = scaler if scaler is not None and scaler.is_enabled() else None
        self.nexus = Nexus(
            optimizer.param_groups,
            inner_lr=inner_lr,
            normalize=normalize,
            grad_scaler=self._scaler,
            replica_group=dist.group.WORLD if self._ddp is not None and sync == "every" else None,
        )
        self.skipped_windows = 0
        self.completed_windows = 0

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Backward of one micro-batch's mean loss (through ``fabric.backward``), then one inner step."""
        if self._ddp is not None and self.sync == "every" and not self._ddp.require_backward_grad_sync:
            raise RuntimeError(
                "NexusFabric(sync='every').backward ran with DDP's gradient sync off (inside "
                "`fabric.no_backward_sync(model)` or `model.no_sync()`): this rank would take its inner step from its "
                "own gradient and the ranks drift apart. Drop the no_backward_sync context (NexusFabric syncs each "
                "micro-batch itself), or use NexusFabric(sync='window') for one all-reduce per window."
            )
        self.fabric.backward(loss, **kwargs)
        self.nexus.inner_step()

    def step(self, max_norm: float | None = None) -> bool:
        """End the window: θ := θ0, ``.grad`` := G, clip to ``max_norm`` (global norm, via Fabric), outer
        ``optimizer.step()``, zero the gradients. Returns False when the window was skipped (a non-finite
        gradient on some rank, or a GradScaler overflow)."""
        result = self.nexus.finish_window()
        if result.num_micro_batches == 0 and not result.skipped:
            raise RuntimeError("NexusFabric.step() called without a backward() in this window.")
        skipped = result.skipped
        if self._ddp is not None and self.sync == "window":
            broadcast_ddp_buffers(self._ddp)
            skipped = average_pseudo_gradients(self.nexus.params, skipped)
        if skipped:
            self._skip(own=result.skipped)
            return False
        scaler = self._scaler
        scale_before = scaler.get_scale() if scaler is not None else None
        if max_norm is not None:
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scale_before is not None and scaler.get_scale() < scale_before:  # G·scale overflowed
            self.skipped_windows += 1
            return False
        self.completed_windows += 1
        return True

    def _skip(self, own: bool) -> None:
        self.skipped_windows += 1
        if self._scaler is not None:
            if not own:  # only another rank abandoned: make this rank's scaler back off too, or the scales diverge
                grads = [p.grad for p in self.nexus.params if p.grad is not None]
                if grads:
                    _local(grads[0]).fill_(float("nan"))
            self.optimizer.step()  # the scaler finds the non-finite .grad, skips the step and backs off
        self.optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def anchor_as_weights(self) -> Iterator[None]:
        """Mid-window, hold θ0 in the live parameters for the duration (a no-op at a window boundary): evaluate
        or save the model inside it, so that what you measure pairs with the optimizer state."""
        nexus = self.nexus
        if not nexus.params_moved:
            yield
            return
        with torch.no_grad():
            stash = [t.clone() for t in nexus._locals]
            torch._foreach_copy_(nexus._locals, nexus.anchor())
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(nexus._locals, stash)
