"""Window-mode data parallelism in pure torch: one bucketed all-reduce of the pseudo-gradient per window.

In window mode every rank runs its own inner trajectory from the shared θ0 without communication (DDP's
gradient sync off for the whole window), and only G is averaged, once, at the outer step (DiLoCo-like).
:class:`~lightning_nexus.NexusDDPStrategy`, :class:`~lightning_nexus.fabric.NexusFabric` and plain
PyTorch loops share these functions::

    ddp = DistributedDataParallel(model)
    ddp.require_backward_grad_sync = False          # window mode: never sync inside the window
    nexus = Nexus(ddp.parameters(), inner_lr=0.05)
    ...                                             # K micro-batches: backward + nexus.inner_step()
    result = nexus.finish_window()
    if not average_pseudo_gradients(nexus.params, result.skipped):
        broadcast_ddp_buffers(ddp)
        optimizer.step()
    optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_nexus import _compat

BUCKET_BYTES = 64 * 2**20
"""Largest flat buffer one all-reduce of G uses (DDP's own default bucket is 25 MiB)."""


def average_pseudo_gradients(params: list[Tensor], skipped: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Average the pseudo-gradients in ``.grad`` across the ranks of ``group`` (default: the world), in
    flat buckets; call it on every rank right after :meth:`~lightning_nexus.Nexus.finish_window`.

    Returns True if any rank skipped its window: then every rank must skip its outer step, or they diverge.
    A parameter that got no gradient on any rank keeps ``.grad = None``.
    """
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return skipped
    device = params[0].device
    # one flag per parameter (did any rank produce a gradient?) and one for "some rank skipped"
    flags = torch.tensor([0.0 if skipped or p.grad is None else 1.0 for p in params] + [float(skipped)], device=device)
    dist.all_reduce(flags, group=group)
    if flags[-1].item() > 0:
        return True
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)  # SUM then divide: gloo has no AVG
        flat.div_(world_size)
        for g, reduced in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(reduced.view_as(g))
    for p, g, got in zip(params, grads, flags[:-1].tolist()):
        p.grad = g if got > 0 else None
    return False


def broadcast_ddp_buffers(ddp: DistributedDataParallel) -> None:
    """Broadcast rank 0's buffers (e.g. BatchNorm running statistics), as DDP does before a forward.

    With backward sync off, DDP stops its own broadcast (it runs only after a synced backward), and each
    rank's statistics follow its own data. Done at the outer step rather than by re-enabling DDP's broadcast
    for the next forward: the traffic is the same, but buffers then agree across ranks after every outer
    step, like the parameters, also after the last one.
    """
    ddp.require_forward_param_sync = True
    if ddp.will_sync_module_buffers():  # honours broadcast_buffers=False
        _compat.ddp_sync_buffers(ddp)
    ddp.require_forward_param_sync = False  # the next forward need not repeat it


def _buckets(tensors: list[Tensor]) -> Generator[list[Tensor], None, None]:
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket
