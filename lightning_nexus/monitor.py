"""GradSimilarityMonitor: live cosine similarity between the micro-batch gradients of a window.

Nexus rewards gradients of different sources that point the same way; this callback shows that
alignment while training, for Nexus runs and for their plain-accumulation (AdamW) twins alike.

How the per-micro-batch gradient is read (it must not depend on NexusCallback, which consumes and
clears ``.grad`` in ``on_after_backward``, nor on the order of the callbacks):

* plain tensors (one device, DDP): a tensor hook (``Tensor.register_hook``) receives the gradient of
  this backward alone, before it is accumulated into ``.grad``. Under plain accumulation ``.grad`` is a
  running sum, so the hook's argument is the only place the micro-batch gradient exists by itself.
  Under DDP the hook runs before the all-reduce: it sees the rank-local gradient. The K stored
  vectors (exact) or sketches are averaged over ranks once at the window's end, which by linearity
  gives exactly the vectors/sketches of the all-reduced gradients, so every rank logs the same
  numbers and they equal one process on the global micro-batch (both ``NexusDDPStrategy`` modes and
  stock DDP).
* DTensor parameters (FSDP2): the sharded parameter is not in the autograd graph, so tensor hooks never
  fire; FSDP2 does call post-accumulate-grad hooks on it after the reduce-scatter. There ``.grad`` may
  already hold earlier micro-batches (plain accumulation), so before each non-first micro-batch the
  monitor moves any existing ``.grad`` aside and adds it back inside the hook, right after reading the
  fresh shard. Each rank holds a disjoint shard of the (already averaged) gradient, so the K×K Gram
  matrix is computed per shard and summed over the shard groups (one K×K all-reduce).

Hooks are registered only for windows that will be logged and removed at the window's end, so the
other windows run exactly as without the monitor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from torch import Tensor
from typing_extensions import override

from lightning_nexus._compat import batches_that_stepped, trainer_callbacks, trainer_log_every_n_steps
from lightning_nexus.core import DTensor, _local, _reduce_groups, dist
from lightning_nexus.window_sources import source_names

DEFAULT_SKETCH_DIM = 16384
"""Count-sketch width m. The cosine estimate has a standard deviation of about √((1+c²)/m) ≈ 0.008-0.011
at m = 16384, well inside ±0.05, and K sketches cost K·64 KiB however large the model is."""

AUTO_EXACT_MAX_FLOATS = 2**24
"""``mode="auto"`` keeps exact per-micro-batch gradients while K × (local parameter count) stays below
this many floats (64 MiB); larger models are sketched."""

_SEED = 0x5EED_0000


@dataclass(frozen=True)
class WindowSimilarity:
    """What the monitor measured in one logged window."""

    step: int
    """``trainer.global_step`` when the window's optimizer step was taken."""
    labels: tuple[str, ...]
    """Source label of each micro-batch, in order."""
    cosine: Tensor
    """K×K cosine similarity of the micro-batch gradients (float64, CPU)."""
    grad_norms: Tensor
    """L2 norm of each micro-batch's gradient of its mean loss (Lightning's 1/K and AMP scale removed)."""
    pairs: dict[str, float]
    """``"<a>__<b>"`` (sorted names) → mean cosine over the micro-batch pairs with those sources."""
    mean: float
    """Mean cosine over all pairs of distinct micro-batches in the window."""


class GradSimilarityMonitor(Callback):
    """Log the cosine similarity between the gradients of the micro-batches of a window, by source.

    Every ``every_n_steps`` optimizer steps it records each micro-batch's gradient (exactly, or as a
    count sketch) and logs

    * ``nexus/grad_cosine/<a>__<b>``: cosine between the gradients of sources ``a`` and ``b`` (sorted
      names; averaged when the pair occurs more than once in the window; ``a == b`` when a source fills
      two micro-batches),
    * ``nexus/grad_cosine/mean``: mean over all pairs of micro-batches (also in the progress bar),
    * ``nexus/grad_norm/<source>``: norm of the gradient of the source's mean loss.

    Sources come from ``batch["source_id"]`` and ``trainer.datamodule.source_names``; a micro-batch whose
    samples come from several sources is labelled ``mixed``; batches without ``source_id`` are labelled by
    position (``mb0``, ``mb1``, ...). Works with and without :class:`~lightning_nexus.NexusCallback`, in
    any callback order, on one device, under DDP (incl. ``NexusDDPStrategy``) and FSDP2.

    Args:
        mode: ``"exact"`` stores K full gradients (memory K × parameters, for small models);
            ``"sketch"`` stores a count sketch of m numbers per micro-batch (cosine error ≈ 1/√m);
            ``"auto"`` picks exact below ``AUTO_EXACT_MAX_FLOATS`` (K × parameters), else sketch.
        sketch_dim: m, the sketch width.
        every_n_steps: measure every n optimizer steps; ``None`` uses ``Trainer(log_every_n_steps)``. It must
            be a multiple of ``log_every_n_steps``, since Lightning drops step metrics between those.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_nexus import NexusCallback
        from lightning_nexus.monitor import GradSimilarityMonitor

        trainer = Trainer(max_steps=4, accumulate_grad_batches=4, log_every_n_steps=2,
                          callbacks=[NexusCallback(), GradSimilarityMonitor()])
        trainer.fit(BoringModel())
    """

    def __init__(
        self,
        mode: Literal["auto", "exact", "sketch"] = "auto",
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        every_n_steps: int | None = None,
    ) -> None:
        if mode not in ("auto", "exact", "sketch"):
            raise ValueError(f"GradSimilarityMonitor(mode={mode!r}): expected 'auto', 'exact' or 'sketch'.")
        if not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ValueError(f"GradSimilarityMonitor(sketch_dim={sketch_dim!r}): expected a positive int.")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"GradSimilarityMonitor(every_n_steps={every_n_steps!r}): expected a positive int or None."
            )
        self.mode = mode
        self.sketch_dim = sketch_dim
        self.every_n_steps = every_n_steps
        self.last: WindowSimilarity | None = None
        self._params: list[Tensor] = []
        self._offsets: list[int] = []
        self._group_of: list[tuple] = []
        self._group_size: dict[tuple, int] = {}
        self._exact = True
        self._replicated_world = 1
        self._buffers: dict[tuple, Tensor] = {}
        self._handles: list[Any] = []
        self._row = -1
        self._labels: list[str] = []
        self._stash: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise RuntimeError(
                f"GradSimilarityMonitor does not support {type(trainer.strategy).__name__}: its flattened "
                "parameters hide the per-parameter gradients. Use DDP (strategy='nexus_ddp' or 'ddp') or FSDP2 "
                "(ModelParallelStrategy)."
            )
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "GradSimilarityMonitor needs Lightning's automatic optimization: it finds the micro-batches of a "
                "window from `accumulate_grad_batches`, which manual optimization does not use."
            )
        every, log_every = self.every_n_steps, trainer_log_every_n_steps(trainer)
        if every is not None and log_every and every % log_every:
            raise ValueError(
                f"GradSimilarityMonitor(every_n_steps={every}) must be a multiple of Trainer(log_every_n_steps="
                f"{log_every}): Lightning only writes step metrics on those steps."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Parameters are final here: DDP has wrapped and FSDP2 has sharded the module.
        seen: set[int] = set()
        self._params, self._offsets, self._group_of, self._group_size = [], [], [], {}
        for p in pl_module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                group = _reduce_groups(p)
                self._params.append(p)
                self._group_of.append(group)
                self._offsets.append(self._group_size.get(group, 0))
                self._group_size[group] = self._group_size.get(group, 0) + _local(p).numel()
        sharded = any(self._group_of)
        if sharded and sum(isinstance(cb, GradSimilarityMonitor) for cb in trainer_callbacks(trainer)) > 1:
            raise RuntimeError(
                "Only one GradSimilarityMonitor per Trainer is supported with sharded (FSDP2) parameters: each "
                "monitor moves the running .grad aside while it reads a micro-batch's shard, and a second one "
                "would read the running sum. Keep one monitor."
            )
        # DDP replicas hold rank-local gradients; FSDP2 shards already hold the averaged gradient.
        self._replicated_world = trainer.world_size if isinstance(trainer.strategy, DDPStrategy) and not sharded else 1
        floats = trainer.accumulate_grad_batches * sum(self._group_size.values())
        self._exact = self.mode == "exact" or (self.mode == "auto" and floats <= AUTO_EXACT_MAX_FLOATS)

    # ------------------------------------------------------------------ the window
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        K = trainer.accumulate_grad_batches
        if batch_idx % K == 0:  # Lightning zeroes .grad in this micro-batch: a window starts
            self._end_window()
            if not self._window_is_logged(trainer):
                return
            self._begin_window(K)
        elif self._row < 0:
            return
        self._row += 1
        if self._row >= next(iter(self._buffers.values())).shape[0]:  # more micro-batches than K: give up
            self._end_window()
            return
        for buf in self._buffers.values():
            buf[self._row].zero_()
        self._labels.append(self._label(trainer, batch, self._row))
        if self._row > 0:
            self._stash_sharded_grads()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # parameters that got no gradient in this micro-batch never saw their hook: restore them here
        self._restore_stash()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._row < 0:
            return
        n = self._row + 1
        gram = self._gram(n)
        labels = tuple(self._labels[:n])
        self._end_window()
        # .grad holds ∇(loss/K)·amp_scale: undo both so norms compare across K and precisions
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        amp = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        norms = gram.diagonal().clamp(min=0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
        result = _summarize(trainer.global_step, labels, cosine, norms * trainer.accumulate_grad_batches / amp)
        self.last = result
        if not math.isfinite(result.mean) and n > 1:
            return  # a non-finite gradient (the window NexusCallback abandons): nothing to show
        log = functools.partial(pl_module.log, on_step=True, on_epoch=False, batch_size=1)
        for name, value in result.pairs.items():
            log(f"nexus/grad_cosine/{name}", value)
        if n > 1:
            log("nexus/grad_cosine/mean", result.mean, prog_bar=True)
        per_source: dict[str, list[float]] = {}
        for label, norm in zip(labels, result.grad_norms.tolist()):
            per_source.setdefault(label, []).append(norm)
        for label, values in per_source.items():
            log(f"nexus/grad_norm/{label}", sum(values) / len(values))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_window()
        self._buffers = {}

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_window()

    # ------------------------------------------------------------------ helpers
    def _window_is_logged(self, trainer: pl.Trainer) -> bool:
        every = self.every_n_steps or trainer_log_every_n_steps(trainer)
        if not every or not self._params:
            return False
        # the same count Lightning's should_update_logs uses; constant until this window steps
        return (batches_that_stepped(trainer) + 1) % every == 0

    def _begin_window(self, K: int) -> None:
        width = None if self._exact else self.sketch_dim
        for group, size in self._group_size.items():
            buf = self._buffers.get(group)
            shape = (K, width or size)
            if buf is None or tuple(buf.shape) != shape:
                device = _local(self._params[self._group_of.index(group)]).device
                self._buffers[group] = torch.zeros(shape, dtype=torch.float32, device=device)
        self._row, self._labels = -1, []
        for i, p in enumerate(self._params):
            if DTensor is not None and isinstance(p, DTensor):
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_sharded_grad, i)))
            else:
                self._handles.append(p.register_hook(functools.partial(self._on_grad, i)))

    def _end_window(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_stash()
        self._row = -1

    def _on_grad(self, i: int, grad: Tensor) -> None:
        self._record(i, grad)

    def _on_sharded_grad(self, i: int, param: Tensor) -> None:
        grad = param.grad
        assert grad is not None  # a post-accumulate-grad hook runs once .grad is set
        self._record(i, grad)
        stashed = self._stash.pop(i, None)
        if stashed is not None:
            _local(grad).add_(_local(stashed))

    @torch.no_grad()
    def _record(self, i: int, grad: Tensor | None) -> None:
        if grad is None or self._row < 0:
            return
        flat = _local(grad).detach().reshape(-1)
        row = self._buffers[self._group_of[i]][self._row]
        if self._exact:
            off = self._offsets[i]
            row[off : off + flat.numel()].add_(flat)
        else:
            bucket, sign = _count_sketch_hash(self._offsets[i], flat.numel(), self.sketch_dim, flat.device)
            row.index_add_(0, bucket, flat.float() * sign)

    def _stash_sharded_grads(self) -> None:
        # FSDP2 adds the new shard onto an existing .grad before its hook runs; moving the running sum
        # aside lets the hook see this micro-batch alone (put back in the hook or in on_after_backward).
        for i, p in enumerate(self._params):
            if DTensor is not None and isinstance(p, DTensor) and p.grad is not None:
                self._stash[i] = p.grad
                p.grad = None

    def _restore_stash(self) -> None:
        for i, stashed in self._stash.items():
            p = self._params[i]
            if p.grad is None:
                p.grad = stashed
            else:
                _local(p.grad).add_(_local(stashed))
        self._stash = {}

    @torch.no_grad()
    def _gram(self, n: int) -> Tensor:
        gram = None
        for group, buf in self._buffers.items():
            vectors = buf[:n]
            if self._replicated_world > 1:  # rank-local gradients → the all-reduced ones (linearity)
                vectors = vectors.clone()
                dist.all_reduce(vectors)
                vectors /= self._replicated_world
            # fp32 GEMM: a float64 copy of K full gradients cost more than the rest of the window's work
            g = (vectors @ vectors.T).double()
            for pg in group:  # disjoint shards: their inner products add up
                dist.all_reduce(g, group=pg)
            gram = g if gram is None else gram + g
        assert gram is not None
        return gram.cpu()

    def _label(self, trainer: pl.Trainer, batch: Any, row: int) -> str:
        source_id = batch.get("source_id") if isinstance(batch, dict) else None
        if not isinstance(source_id, Tensor) or source_id.numel() == 0:
            return f"mb{row}"
        ids = source_id.reshape(-1)
        first = int(ids[0])
        if bool((ids != first).any()):
            return "mixed"
        names = source_names(trainer)  # the datamodule's, else per_source_dataloader's
        return str(names[first]) if names is not None and 0 <= first < len(names) else f"source{first}"


def _summarize(step: int, labels: tuple[str, ...], cosine: Tensor, norms: Tensor) -> WindowSimilarity:
    sums: dict[str, list[float]] = {}
    all_pairs = []
    n = len(labels)
    for a in range(n):
        for b in range(a + 1, n):
            value = float(cosine[a, b])
            all_pairs.append(value)
            sums.setdefault("__".join(sorted((labels[a], labels[b]))), []).append(value)
    pairs = {k: sum(v) / len(v) for k, v in sorted(sums.items())}
    mean = sum(all_pairs) / len(all_pairs) if all_pairs else float("nan")
    return WindowSimilarity(step, labels, cosine, norms, pairs, mean)


def _count_sketch_hash(offset: int, n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bucket in [0, m) and sign ±1 of elements ``offset .. offset+n`` of a group's flattened local gradient.

    Drawn from a generator seeded by ``offset``, so every rank and every micro-batch gets the same
    hashes without storing them (that would cost as much memory as the model); one ``randint`` is
    several times cheaper than an arithmetic hash of the positions. FSDP2 shards hash alike, which is
    fine because their Gram matrices are summed, never their sketches.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(_SEED + offset)
    r = torch.randint(0, 2 * m, (n,), generator=gen, device=device)
    sign = (r & 1).float().mul_(2).sub_(1)
    return r >> 1, sign
