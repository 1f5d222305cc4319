"""The Nexus update rule in pure torch (no Lightning), usable from any training loop.

One *window* is the K micro-batches of one outer optimizer step::

    θ0 = params                                   (anchor, taken at the first inner step)
    for each micro-batch k:  d_k = g_k/‖g_k‖ (or g_k raw);  θ_k = θ_{k-1} − γ·d_k
    G = mean_k d_k = (θ0 − θ_K)/(γ·K);  params := θ0;  .grad := G;  outer_optimizer.step()

Sign convention: ``.grad`` receives ``(θ0 − θ_K)/(γK)``, a *descent* gradient, so the outer optimizer
(which subtracts its update) moves the parameters the same way the inner steps did.

Memory: one fp32 (or wider) buffer per parameter. With γ > 0 it holds the anchor θ0 and G is read off
the displacement; with γ = 0 the parameters never move, so the same buffer accumulates Σ d_k instead.
``exact=True`` adds a second buffer that accumulates Σ d_k beside θ0, so that G does not inherit the
rounding of the weights (see docs/gpu.md for when that matters).

Host syncs: none per micro-batch. The norm, the step length γ/‖g‖ and the finite check stay on the
device; whether a window is abandoned is read once, in :meth:`Nexus.finish_window`.
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
        grad_scaler: the ``torch.amp.GradScaler`` that scaled the loss before each backward (16-mixed). The
            core divides its scale out of the inner gradients and writes G *in the scaled domain*, so that
            ``scaler.unscale_`` / ``scaler.step`` yields G; an abandoned window leaves ``.grad`` non-finite, so
            ``scaler.step`` skips and ``scaler.update`` backs the scale off. ``inner_step``'s ``loss_scale`` is
            then only the factor the caller applied itself (e.g. ``1/K``).
        replica_group: the process group over which the parameters are *replicated* and every micro-batch's
            gradient is already averaged (DDP without ``no_sync``: exact semantics). During the first window
            each inner step checks that all ranks hold the same gradient norm, and refuses if they differ (DDP's
            gradient sync was switched off, e.g. by ``no_sync`` or Fabric's ``no_backward_sync``), before the
            parameters move. ``None``: no check (one process, or window mode, where ranks differ on purpose).
        exact: keep Σ d_k in a second fp32 buffer and hand the outer optimizer G = Σ d_k / n instead of
            reading G off the weights as (θ0 − θ_K)/(γn). That read-off loses about ulp(θ)/(2γ) per entry, a
            large relative error where γ·d is small against |θ| (norm gains, embeddings of big models); the
            exact mode costs one more fp32 parameter copy and one more pass per micro-batch. Only matters
            with γ > 0: with γ = 0 the one buffer already accumulates Σ d_k.

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
        grad_scaler: torch.amp.GradScaler | None = None,
        replica_group: dist.ProcessGroup | None = None,
        exact: bool = False,
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
        self.exact = bool(exact)
        # exact mode: Σ d_k beside θ0 (allocated once, here, so that peak memory shows at once)
        self._direction_sum: list[Tensor] = [torch.empty_like(b) for b in self._buffer] if self.exact else []
        shard_groups = _as_groups(shard_group)
        self._groups = [_reduce_groups(p, shard_groups) for p in self.params]
        # every rank runs the same collectives in the same order, even where it holds no gradient (an FSDP1
        # rank whose shard misses a parameter sees .grad None for it)
        self._group_order = list(dict.fromkeys(self._groups))
        self._device = self._locals[0].device
        self._precision_checked = not any(t.dtype in _LOW_PRECISION for t in self._locals)
        self.grad_scaler = grad_scaler
        self.replica_group = replica_group
        self._replicas_verified = replica_group is None
        self._reset_window()

    # ---------------------------------------------------------------- state
    def _reset_window(self) -> None:
        self.window_position = 0
        self.abandoned = False
        self._window_lr = self.inner_lr
        self._touched = [False] * len(self.params)
        # one 0-dim device tensor per inner step, non-finite iff that step went wrong; read in finish_window
        self._pending_checks: list[Tensor] = []

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
    def inner_step(self, loss_scale: float | Tensor = 1.0, zero_grad_to_none: bool = True) -> bool:
        """Take one inner step from the gradients in ``.grad`` and clear them.

        Args:
            loss_scale: ``.grad`` holds ``loss_scale · ∇loss_k`` (e.g. ``amp_scale / K`` in Lightning);
                it is divided out for raw directions and is irrelevant to normalized ones. A 0-dim tensor
                (e.g. a GradScaler's scale on the GPU) is used where it lies, without a host sync.
            zero_grad_to_none: clear ``.grad`` by setting it to ``None`` (saves a pass) rather than zeroing
                in place (needed where someone inspects ``.grad`` before the next backward, e.g. GradScaler).

        Returns:
            False if the window is already known to be abandoned (a ``loss_scale`` number that is not finite
            and positive), True otherwise. A non-finite gradient is detected on the device, without a host
            sync: :meth:`finish_window` then abandons the whole window and reports ``skipped``.
        """
        if self.abandoned:
            return False
        loss_scale = self._with_amp_scale(loss_scale)
        if not isinstance(loss_scale, Tensor) and not (math.isfinite(loss_scale) and loss_scale > 0):
            self._abandon()
            return False
        idx, grads = self._present_grads()
        if self.window_position == 0:
            self._begin_window()
        norm = self._global_norm(grads, [self._groups[i] for i in idx])  # 0-dim, on the device
        if not self._replicas_verified:
            self._verify_replicas(norm)
        self._pending_checks.append(norm)
        if isinstance(loss_scale, Tensor):
            self._pending_checks.append(torch.where(loss_scale > 0, loss_scale, math.nan).to(norm))
        coef: Tensor | float
        if self.normalize:
            # a non-finite norm makes the step non-finite too; finish_window restores θ0 from the buffer
            coef = torch.where(norm > 0, norm.reciprocal(), 0.0)
        else:
            coef = loss_scale.reciprocal() if isinstance(loss_scale, Tensor) else 1.0 / loss_scale
        if isinstance(coef, Tensor) and not any(g.dtype == torch.float64 for g in grads):
            coef = coef.float()  # a float64 factor would make every update kernel convert it
        if self._window_lr > 0:  # θ_k = θ_{k-1} − γ·d_k
            if idx:
                _add_scaled_([self._locals[i] for i in idx], grads, coef, -self._window_lr)
                if self.exact:
                    _add_scaled_([self._direction_sum[i] for i in idx], grads, coef, 1.0)
            if not self._precision_checked:  # a collective: also on ranks without gradients
                self._check_precision(idx, grads)
        elif idx:  # γ = 0: parameters stay at θ0, accumulate Σ d_k
            _add_scaled_([self._buffer[i] for i in idx], grads, coef, 1.0)
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

        This is where the device's finite checks of the window are read: the one host sync per window.
        """
        self._settle()
        result = WindowResult(self.window_position, self.abandoned, self._window_lr)
        idx = [i for i, touched in enumerate(self._touched) if touched]
        if (
            self.window_position > 0 and not self.abandoned and idx
        ):  # idx is empty on a rank whose shard got no gradient
            buf = [self._buffer[i] for i in idx]
            scale = self._scaler_scale()  # G goes in the scaled domain: unscale_ / a fused step divide it out
            if self._window_lr > 0 and not self.exact:  # G = (θ0 − θ_K)/(γn), then θ := θ0
                live = [self._locals[i] for i in idx]
                pseudo = torch._foreach_sub(buf, live)  # exact where θ0, θ_K are within 2x (Sterbenz)
                factor = 1.0 / (self._window_lr * self.window_position)
                torch._foreach_mul_(pseudo, factor if scale is None else scale * factor)
            else:  # G = Σd/n: the exact mode's own buffer, or with γ = 0 the only one
                sums = [self._direction_sum[i] for i in idx] if self._window_lr > 0 else buf
                factor = 1.0 / self.window_position
                pseudo = torch._foreach_mul(sums, factor if scale is None else scale * factor)
            if self._window_lr > 0:
                torch._foreach_copy_([self._locals[i] for i in idx], buf)
            for i, g in zip(idx, pseudo):
                _write_grad(self.params[i], g)
            for i, touched in enumerate(self._touched):
                if not touched:
                    self.params[i].grad = None
        if self.window_position > 0:
            self._replicas_verified = True
        if self.abandoned:  # also when the abandoning micro-batch was before a resume: its NaN is gone
            self._poison_grads()
        self._reset_window()
        return result

    def pseudo_grad_norm(self) -> float:
        """Global L2 norm of the current ``.grad`` (call right after :meth:`finish_window`)."""
        idx, grads = self._present_grads()
        return float(self._global_norm(grads, [self._groups[i] for i in idx]))

    def _present_grads(self) -> tuple[list[int], list[Tensor]]:
        """The indices of the parameters that hold a ``.grad``, and those gradients' local tensors."""
        present = [(i, _local(p.grad)) for i, p in enumerate(self.params) if p.grad is not None]
        return [i for i, _ in present], [g for _, g in present]

    @torch.no_grad()
    def restore_anchor(self) -> None:
        """Abandon the window without poisoning gradients: parameters return to θ0 (e.g. training stopped)."""
        idx = [i for i, touched in enumerate(self._touched) if touched]
        if self.params_moved and idx:
            torch._foreach_copy_([self._locals[i] for i in idx], [self._buffer[i] for i in idx])
        self._reset_window()

    # ---------------------------------------------------------------- mid-window checkpoints
    def window_state(self, live: Sequence[Tensor] | None = None) -> dict | None:
        """The unfinished window as plain data, for a checkpoint whose weights are θ0; ``None`` between windows.

        ``inner`` holds this process's local tensors: the inner point θ_k when γ > 0 (the parameters), the sum
        Σ d_k when γ = 0 (the buffer); ``None`` for an abandoned window. Pass ``live`` when the parameters hold
        something else for the moment (θ0 swapped in for validation): the tensors that are the inner point.
        """
        self._settle()  # a checkpoint must know whether the window is already lost (one host sync)
        if not self.in_window:
            return None
        inner = direction_sum = None
        if not self.abandoned and self.exact and self._window_lr > 0:
            direction_sum = [t.detach().clone() for t in self._direction_sum]
        if not self.abandoned:
            source = self._buffer if self._window_lr == 0 else (live if live is not None else self._locals)
            inner = [t.detach().clone() for t in source]
        return {
            "window_position": self.window_position,
            "abandoned": self.abandoned,
            "inner_lr": self._window_lr,
            "touched": list(self._touched),
            "inner": inner,
            "direction_sum": direction_sum,
        }

    @torch.no_grad()
    def load_window_state(self, state: dict) -> None:
        """Continue a window saved by :meth:`window_state`. The parameters must hold that window's θ0 (the
        weights of the checkpoint it came from); ``inner`` must be this process's local tensors."""
        if len(state["touched"]) != len(self.params):
            raise ValueError(
                f"Nexus.load_window_state: the saved window covers {len(state['touched'])} trainable tensors, "
                f"this model has {len(self.params)}. Resume with the model (and frozen layers) that wrote it."
            )
        self._reset_window()
        self._window_lr = float(state["inner_lr"])
        if state["inner"] is not None:
            target = self._locals if self._window_lr > 0 else self._buffer
            inner = [t.to(device=b.device, dtype=b.dtype) for t, b in zip(state["inner"], target)]
            if self._window_lr > 0:
                torch._foreach_copy_(self._buffer, self._locals)  # θ0
            torch._foreach_copy_(target, inner)  # θ_k, or Σ d_k with γ = 0
            if self.exact and self._window_lr > 0:
                saved = state.get("direction_sum")
                if saved is not None:
                    torch._foreach_copy_(
                        self._direction_sum, [t.to(b.device, b.dtype) for t, b in zip(saved, self._buffer)]
                    )
                else:  # written without exact mode: Σ d_k is only known through the weights
                    sums = torch._foreach_sub(self._buffer, [t.to(b.dtype) for t, b in zip(self._locals, self._buffer)])
                    torch._foreach_mul_(sums, 1.0 / self._window_lr)
                    torch._foreach_copy_(self._direction_sum, sums)
        self.window_position = int(state["window_position"])
        self.abandoned = bool(state["abandoned"])
        self._touched = [bool(t) for t in state["touched"]]

    # ---------------------------------------------------------------- helpers
    def _begin_window(self) -> None:
        self._window_lr = self.inner_lr
        if self._window_lr > 0:
            torch._foreach_copy_(self._buffer, self._locals)
            if self.exact:
                torch._foreach_zero_(self._direction_sum)
        else:
            torch._foreach_zero_(self._buffer)

    def _scaler_scale(self) -> Tensor | None:
        """The GradScaler's scale as a 0-dim tensor on the device (``scaler.scale(1)``): ``get_scale()``
        would be a host sync. ``None`` without an enabled scaler."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), dtype=torch.float32, device=self._device))

    def _with_amp_scale(self, loss_scale: float | Tensor) -> float | Tensor:
        if self.grad_scaler is None:
            return loss_scale
        if loss_scale > 1:
            raise ValueError(
                f"Nexus.inner_step(loss_scale={loss_scale!r}) with Nexus(grad_scaler=...): the core reads the "
                "GradScaler's scale itself, so loss_scale must be only the factor your code applied to the loss "
                "(e.g. 1/K, or 1). Counting the scale twice would shrink every raw inner step by it."
            )
        scale = self._scaler_scale()
        # normalized directions do not depend on the scale: do not spend kernels on it
        return loss_scale if scale is None or self.normalize else loss_scale * scale

    def _verify_replicas(self, norm: Tensor) -> None:
        """Refuse an exact (replicated) window whose ranks hold different gradients: DDP sync was off.
        Runs in the first window only; its host sync is the price of refusing before the parameters move."""
        local = torch.where(norm.isfinite(), norm, math.inf).to(_wide(self._device))
        bounds = torch.stack([local, -local])
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.replica_group)
        high, low = float(bounds[0]), -float(bounds[1])
        if high == low or (math.isfinite(high) and high - low <= 1e-5 * high):
            return
        self.restore_anchor()
        raise RuntimeError(
            f"Nexus(replica_group=...): the ranks' gradient norms differ ({low:.6g} .. {high:.6g}) in a window "
            "that needs every micro-batch's gradient averaged over all ranks, so each rank would take its own "
            "inner steps and the replicas drift apart. DDP's gradient sync was off for this backward: remove "
            "`no_sync()` / `fabric.no_backward_sync(...)` (and `require_backward_grad_sync = False`) from the "
            "accumulation loop, or run window mode (no sync inside the window, one all-reduce of G: "
            "lightning_nexus.replicas.average_pseudo_gradients, or NexusFabric(sync='window')) without replica_group."
        )

    def _settle(self) -> None:
        """Read the window's device-side finite checks (one host sync) and abandon it if one failed."""
        checks, self._pending_checks = self._pending_checks, []
        if checks and not self.abandoned and not bool(torch.stack(checks).isfinite().all()):
            self._abandon()

    def _abandon(self) -> None:
        """Parameters back to θ0; the rest of the window takes no steps."""
        self.restore_anchor()
        self.abandoned = True

    def _poison_grads(self) -> None:
        """Leave a NaN in ``.grad`` so that a GradScaler skips the step and backs off (a norm can overflow
        while every element is finite, and the inner steps cleared the micro-batch gradients)."""
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        if grads:
            grads[0].fill_(float("nan"))
            return
        i = next((i for i, touched in enumerate(self._touched) if touched), 0)
        _write_grad(self.params[i], torch.full_like(self._locals[i], float("nan")))

    @torch.no_grad()
    def distance_to_anchor(self) -> float:
        """‖θ − θ0‖ over all parameters and shards, e.g. the outer step right after ``optimizer.step()``
        (the buffer holds θ0 until the next window starts; only meaningful with γ > 0)."""
        # one tensor-sized temporary at a time, not a second copy of the model
        norms = [torch.linalg.vector_norm(t.to(a.dtype) - a) for t, a in zip(self._locals, self._buffer)]
        return float(self._reduce_norms(norms, self._groups))

    def _global_norm(self, tensors: list[Tensor], groups: list[tuple]) -> Tensor:
        norms: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        low = [i for i, t in enumerate(tensors) if t.dtype in _LOW_PRECISION]
        high = [i for i, t in enumerate(tensors) if t.dtype not in _LOW_PRECISION]
        # bf16/fp16 norms must come back in fp32: rounded to 3 digits they would mis-scale every step
        for ids, kwargs in ((low, {"dtype": torch.float32}), (high, {})):
            if ids:
                group = [tensors[i] for i in ids]
                cpu = group[0].device.type == "cpu"
                for i, n in zip(
                    ids, _blocked_norms(group, **kwargs) if cpu else torch._foreach_norm(group, 2, **kwargs)
                ):
                    norms[i] = n
        return self._reduce_norms(norms, groups)

    def _reduce_norms(self, norms: list[Tensor], groups: list[tuple]) -> Tensor:
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
        return total.sqrt()  # stays on the device: the finite check is read in finish_window

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


_CPU_NORM_BLOCK = 1024
_CPU_NORM_BLOCKED_ABOVE = 2**16  # up to here a plain fp32 CPU norm is within ~2e-7


def _blocked_norms(tensors: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """L2 norms on the CPU, whose reductions accumulate sequentially in the input's precision: the fp32 norm
    of a 38M-entry embedding gradient comes out 0.3% off. Large tensors get norms of 1024-entry blocks,
    combined in float64 (exact to ~1e-9, about as fast); small ones one multi-tensor norm (CUDA reductions
    are trees and need none of this)."""
    small = [i for i, t in enumerate(tensors) if t.numel() <= _CPU_NORM_BLOCKED_ABOVE]
    out: dict[int, Tensor] = {}
    if small:
        kwargs = {} if dtype is None else {"dtype": dtype}
        out.update(zip(small, torch._foreach_norm([tensors[i] for i in small], 2, **kwargs)))
    for i, t in enumerate(tensors):
        if i in out:
            continue
        flat = t.reshape(-1)
        head = flat.numel() - flat.numel() % _CPU_NORM_BLOCK
        parts = [torch.linalg.vector_norm(flat[head:], dtype=dtype).reshape(1)]
        if head:
            parts.append(torch.linalg.vector_norm(flat[:head].view(-1, _CPU_NORM_BLOCK), dim=1, dtype=dtype))
        out[i] = torch.cat(parts).double().square().sum().sqrt()
    return [out[i] for i in range(len(tensors))]


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


def _add_scaled_(targets: list[Tensor], tensors: list[Tensor], coef: float | Tensor, alpha: float) -> None:
    """``targets += alpha · coef · tensors`` in one pass; ``coef`` a number or a 0-dim tensor on the device,
    whose value the host never reads (``_foreach_add_`` takes only a Python number as ``alpha``)."""
    if isinstance(coef, Tensor):
        torch._foreach_addcmul_(targets, tensors, [coef] * len(targets), value=alpha)
    else:
        torch._foreach_add_(targets, tensors, alpha=alpha * coef)


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
