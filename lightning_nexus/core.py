"""The Nexus update rule in pure torch (no Lightning), usable from any training loop.

One *window* is the K micro-batches of one outer optimizer step::

    θ0 = params                                   (anchor, taken at the first inner step)
    for each micro-batch k:  d_k = g_k/‖g_k‖ (or g_k raw);  θ_k = θ_{k-1} − γ·d_k
    G = mean_k d_k = (θ0 − θ_K)/(γ·K);  params := θ0;  .grad := G;  outer_optimizer.step()

Sign convention: ``.grad`` receives ``(θ0 − θ_K)/(γK)``, a *descent* gradient, so the outer optimizer
(which subtracts its update) moves the parameters the same way the inner steps did.

Memory: one fp32 (or wider) buffer per parameter. With γ > 0 it holds the anchor θ0 and G is read off
the displacement; with γ = 0 the parameters never move, so the same buffer accumulates Σ d_k instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # DTensor (FSDP2, tensor parallel) is optional: torch may be built without distributed.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Fractions of inner updates that vanish in low-precision parameters at which we warn / refuse.
_LOST_UPDATE_WARN = 0.01
_LOST_UPDATE_ERROR = 0.5


@dataclass(frozen=True)
class WindowResult:
    """What :meth:`Nexus.finish_window` did."""

    num_micro_batches: int
    """Inner steps taken in the window (a partial window has fewer than K)."""
    skipped: bool
    """True when a non-finite gradient abandoned the window: do not step the outer optimizer."""
    inner_lr: float
    """The γ used for this window."""


def _local(t: Tensor) -> Tensor:
    """The process-local storage of ``t``: elementwise math on shards needs no communication."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _reduce_groups(p: Tensor, shard_groups: tuple = ()) -> tuple:
    """Process groups whose members hold *different* pieces of ``p`` (a sum of squares must be reduced):
    a DTensor's shard dimensions, or for a plain tensor the groups the caller said it is sharded over."""
    if DTensor is None or not isinstance(p, DTensor):
        return shard_groups
    return tuple(p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard())


def _as_groups(shard_group: dist.ProcessGroup | Sequence[dist.ProcessGroup] | None) -> tuple:
    if shard_group is None:
        return ()
    groups = tuple(shard_group) if isinstance(shard_group, Sequence) else (shard_group,)
    if groups and dist is None:  # pragma: no cover
        raise ValueError("Nexus(shard_group=...) needs torch.distributed, which this torch build lacks.")
    return groups


class Nexus:
    """Nexus inner loop over a set of parameters: call :meth:`inner_step` after every micro-batch's
    backward and :meth:`finish_window` before the outer ``optimizer.step()``.

    Args:
        params: the parameters the outer optimizer updates (tensors or optimizer-style param groups).
        inner_lr: γ ≥ 0, the length of each normalized inner step. γ = 0 means no inner movement
            (normalized gradient accumulation).
        normalize: use ``g/‖g‖₂`` (global norm over all params and shards) as inner direction;
            ``False`` uses the raw gradient (Fish-style inner SGD).
        shard_group: the process group (or several, e.g. the dimensions of a mesh) over which the
            *plain-tensor* parameters are sharded, each rank holding a disjoint piece (FSDP1's flat-parameter
            shards: pass the root FSDP module's ``process_group``). Sums of squares of plain tensors are
            all-reduced over it, so norms are global. ``None`` (default): plain tensors are whole on every
            rank (one device, DDP). Unlike ``torch.distributed``, ``None`` does not mean the world group:
            pass ``torch.distributed.group.WORLD`` for that. DTensors (FSDP2) carry their own placements and
            ignore it. Every rank of the group must call :meth:`inner_step` together, also with no gradients.

    Example::

        nexus = Nexus(model.parameters(), inner_lr=0.05)
        for window in windows:                       # K micro-batches per outer step
            for x, y in window:
                loss_fn(model(x), y).backward()
                nexus.inner_step()                   # consumes .grad, moves the params
            if not nexus.finish_window().skipped:    # params := anchor, .grad := G
                optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        inner_lr: float = 0.05,
        normalize: bool = True,
        shard_group: dist.ProcessGroup | Sequence[dist.ProcessGroup] | None = None,
    ):
        if not (isinstance(inner_lr, (int, float)) and math.isfinite(inner_lr) and inner_lr >= 0):
            raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr!r}.")
        self.params = _unique_trainable(params)
        if not self.params:
            raise ValueError("Nexus got no trainable parameters (all have requires_grad=False or the list is empty).")
        self.inner_lr = float(inner_lr)
        self.normalize = normalize
        self._locals = [_local(p) for p in self.params]
        # fp32 at least, wider if the parameter is wider: the buffer is the master copy of θ0.
        self._buffer = [torch.empty_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in self._locals]
        shard_groups = _as_groups(shard_group)
        self._groups = [_reduce_groups(p, shard_groups) for p in self.params]
        # every rank runs the same collectives in the same order, even where it holds no gradient (an FSDP1
        # rank whose shard misses a parameter sees .grad None for it)
        self._group_order = list(dict.fromkeys(self._groups))
        self._device = self._locals[0].device
        self._precision_checked = not any(t.dtype in _LOW_PRECISION for t in self._locals)
        self._reset_window()

    # ---------------------------------------------------------------- state
    def _reset_window(self) -> None:
        self.window_position = 0
        self.abandoned = False
        self._window_lr = self.inner_lr
        self._touched = [False] * len(self.params)

    @property
    def in_window(self) -> bool:
        """True between the first inner step of a window and :meth:`finish_window`."""
        return self.window_position > 0 or self.abandoned

    @property
    def params_moved(self) -> bool:
        """True while the live parameters differ from the anchor (mid-window with γ > 0)."""
        return self.window_position > 0 and not self.abandoned and self._window_lr > 0

    def anchor(self) -> list[Tensor]:
        """θ0 of the current window as local fp32 tensors (valid while :attr:`params_moved`)."""
        return self._buffer

    # ---------------------------------------------------------------- the rule
    @torch.no_grad()
    def inner_step(self, loss_scale: float = 1.0, zero_grad_to_none: bool = True) -> bool:
        """Take one inner step from the gradients in ``.grad`` and clear them.

        Args:
            loss_scale: ``.grad`` holds ``loss_scale · ∇loss_k`` (e.g. ``amp_scale / K`` in Lightning);
                it is divided out for raw directions and is irrelevant to normalized ones.
            zero_grad_to_none: clear ``.grad`` by setting it to ``None`` (saves a pass) rather than zeroing
                in place (needed where someone inspects ``.grad`` before the next backward, e.g. GradScaler).

        Returns:
            False if the window is (now) abandoned because of a non-finite gradient, True otherwise.
        """
        if self.abandoned:
            return False
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if self.window_position == 0:
            self._begin_window()
        grads = [_local(self.params[i].grad) for i in idx]
        norm = self._global_norm(grads, [self._groups[i] for i in idx])
        if not math.isfinite(norm) or not math.isfinite(loss_scale) or loss_scale <= 0:
            self._abandon(grads)
            return False
        if self.normalize:
            coef = 1.0 / norm if norm > 0 else 0.0
        else:
            coef = 1.0 / loss_scale
        if coef > 0 and self._window_lr > 0:  # θ_k = θ_{k-1} − γ·d_k
            if idx:
                torch._foreach_add_([self._locals[i] for i in idx], grads, alpha=-self._window_lr * coef)
            if not self._precision_checked:  # a collective: also on ranks without gradients
                self._check_precision(idx, grads)
        elif coef > 0 and idx:  # γ = 0: parameters stay at θ0, accumulate Σ d_k
            torch._foreach_add_([self._buffer[i] for i in idx], grads, alpha=coef)
        for i in idx:
            self._touched[i] = True
        self.window_position += 1
        if zero_grad_to_none:
            for i in idx:
                self.params[i].grad = None
        else:
            torch._foreach_zero_(grads)
        return True

    @torch.no_grad()
    def finish_window(self) -> WindowResult:
        """Return the parameters to θ0 and write the pseudo-gradient G into ``.grad``.

        Parameters that got no gradient in the whole window keep ``.grad = None`` (as in plain
        accumulation). After an abandoned window ``.grad`` is left non-finite on purpose, so that a
        ``GradScaler`` skips the step and backs off; other callers must not step when ``skipped``.
        """
        result = WindowResult(self.window_position, self.abandoned, self._window_lr)
        idx = [i for i, touched in enumerate(self._touched) if touched]
        if (
            self.window_position > 0 and not self.abandoned and idx
        ):  # idx is empty on a rank whose shard got no gradient
            buf = [self._buffer[i] for i in idx]
            if self._window_lr > 0:  # G = (θ0 − θ_K)/(γn), then θ := θ0
                live = [self._locals[i] for i in idx]
                pseudo = torch._foreach_sub(buf, live)
                torch._foreach_mul_(pseudo, 1.0 / (self._window_lr * self.window_position))
                torch._foreach_copy_(live, buf)
            else:  # G = Σd/n
                pseudo = torch._foreach_mul(buf, 1.0 / self.window_position)
            for i, g in zip(idx, pseudo):
                _write_grad(self.params[i], g)
            for i, touched in enumerate(self._touched):
                if not touched:
                    self.params[i].grad = None
        self._reset_window()
        return result

    def pseudo_grad_norm(self) -> float:
        """Global L2 norm of the current ``.grad`` (call right after :meth:`finish_window`)."""
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        return self._global_norm([_local(self.params[i].grad) for i in idx], [self._groups[i] for i in idx])

    @torch.no_grad()
    def restore_anchor(self) -> None:
        """Abandon the window without poisoning gradients: parameters return to θ0 (e.g. training stopped)."""
        idx = [i for i, touched in enumerate(self._touched) if touched]
        if self.params_moved and idx:
            torch._foreach_copy_([self._locals[i] for i in idx], [self._buffer[i] for i in idx])
        self._reset_window()

    # ---------------------------------------------------------------- helpers
    def _begin_window(self) -> None:
        self._window_lr = self.inner_lr
        if self._window_lr > 0:
            torch._foreach_copy_(self._buffer, self._locals)
        else:
            torch._foreach_zero_(self._buffer)

    def _abandon(self, grads: list[Tensor]) -> None:
        self.restore_anchor()
        self.abandoned = True
        if grads:  # a norm can overflow while every element is finite: make the skip unmistakable
            grads[0].fill_(float("nan"))

    @torch.no_grad()
    def distance_to_anchor(self) -> float:
        """‖θ − θ0‖ over all parameters and shards, e.g. the outer step right after ``optimizer.step()``
        (the buffer holds θ0 until the next window starts; only meaningful with γ > 0)."""
        # one tensor-sized temporary at a time, not a second copy of the model
        norms = [torch.linalg.vector_norm(t.to(a.dtype) - a) for t, a in zip(self._locals, self._buffer)]
        return self._reduce_norms(norms, self._groups)

    def _global_norm(self, tensors: list[Tensor], groups: list[tuple]) -> float:
        norms: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        low = [i for i, t in enumerate(tensors) if t.dtype in _LOW_PRECISION]
        high = [i for i, t in enumerate(tensors) if t.dtype not in _LOW_PRECISION]
        # bf16/fp16 norms must come back in fp32: rounded to 3 digits they would mis-scale every step
        for ids, kwargs in ((low, {"dtype": torch.float32}), (high, {})):
            if ids:
                for i, n in zip(ids, torch._foreach_norm([tensors[i] for i in ids], 2, **kwargs)):
                    norms[i] = n
        return self._reduce_norms(norms, groups)

    def _reduce_norms(self, norms: list[Tensor], groups: list[tuple]) -> float:
        device = norms[0].device if norms else self._device
        wide = _wide(device)
        total = torch.zeros((), dtype=wide, device=device)
        by_group: dict[tuple, list[Tensor]] = {g: [] for g in self._group_order}
        for n, g in zip(norms, groups):
            by_group[g].append(n)
        for group, ns in by_group.items():
            if not ns and not group:
                continue
            # a wide sum: no overflow or cancellation however many tensors there are
            sq = torch.stack([n.to(wide) for n in ns]).square().sum() if ns else total.new_zeros(())
            for pg in group:  # sharded tensors: each rank holds a disjoint piece
                dist.all_reduce(sq, group=pg)
            total = total + sq
        return math.sqrt(total.item())  # the one host sync per micro-batch: decides finite/abandon

    def _check_precision(self, idx: list[int], grads: list[Tensor]) -> None:
        """First inner step with low-precision parameters: count updates that rounding erased."""
        self._precision_checked = True
        lost = moved = 0
        for i, g in zip(idx, grads):
            if self._locals[i].dtype not in _LOW_PRECISION:
                continue
            wanted = g != 0
            lost += int(((self._locals[i].float() == self._buffer[i]) & wanted).sum())
            moved += int(wanted.sum())
        if dist is not None and dist.is_available() and dist.is_initialized():
            # ranks see different data (DDP window mode) or shards (FSDP): decide together, or one rank
            # raises while the others wait in the next collective
            counts = torch.tensor([lost, moved], dtype=_wide(self._device), device=self._device)
            dist.all_reduce(counts)
            lost, moved = int(counts[0].item()), int(counts[1].item())
        frac = lost / max(moved, 1)
        msg = (
            f"Nexus: {frac:.0%} of the inner updates γ·d (γ={self._window_lr}) vanish when rounded to the "
            "bf16/fp16 parameters, so the pseudo-gradient would be mostly rounding noise. Keep fp32 master "
            "weights (Lightning precision='bf16-mixed' instead of 'bf16-true') or raise inner_lr."
        )
        if frac > _LOST_UPDATE_ERROR:
            self.restore_anchor()
            raise RuntimeError(msg)
        if frac > _LOST_UPDATE_WARN:
            warnings.warn(msg, stacklevel=3)


def _wide(device: torch.device) -> torch.dtype:
    """Accumulation dtype for sums of squares: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _unique_trainable(params: Iterable[Tensor] | Iterable[dict]) -> list[Tensor]:
    out, seen = [], set()
    for item in params:
        for p in item["params"] if isinstance(item, dict) else [item]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _write_grad(p: Tensor, value: Tensor) -> None:
    if p.grad is not None:
        _local(p.grad).copy_(value)
        return
    value = value.to(p.dtype)
    if DTensor is not None and isinstance(p, DTensor):
        value = DTensor.from_local(
            value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    p.grad = value
