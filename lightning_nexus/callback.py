"""NexusCallback: runs the Nexus inner loop inside Lightning's automatic optimization.

Hook mapping (Lightning 2.6, ``accumulate_grad_batches=K``)::

    on_after_backward          every micro-batch: inner step from .grad (Lightning's 1/K and the AMP
                               scale are divided out), then .grad is cleared
    on_before_optimizer_step   window boundary: params := θ0, .grad := G; Lightning then clips .grad
                               and steps the outer optimizer
    on_save_checkpoint         a mid-window checkpoint stores the anchor θ0 as the weights (under FSDP1
                               NexusFSDPStrategy swaps θ0 in while it gathers the state dict instead);
                               state_dict adds the window's inner point, so that resuming (on_train_start)
                               continues the window exactly (docs/reliability.md)
    on_validation_epoch_*      validation mid-window sees θ0, not a point on the inner trajectory
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

import lightning_nexus.strategies  # noqa: F401  (registers the nexus_* strategy names)
from lightning_nexus._compat import logger_will_write, mark_overflow, optimizer_unscales_in_step, trainer_callbacks
from lightning_nexus.contract import NexusStrategy
from lightning_nexus.core import DTensor, Nexus, _local, _unique_trainable
from lightning_nexus.window_sources import WindowSourceCheck, source_names

if DTensor is not None:
    from torch.distributed.tensor import distribute_tensor

DEFAULT_INNER_LR = 0.05
"""Default γ. Measured on a 0.84M-parameter GPT with 3 sources, K=3 and AdamW lr 1e-3:
γ=0.01 did nothing, 0.05 helped (inner displacement ≈ 0.7× the outer step), 0.2 hurt. The useful range
depends on model size and outer LR: tune γ so that ``nexus/inner_to_outer_ratio`` sits near 0.5-1."""

DEFAULT_MAX_CONSECUTIVE_SKIPPED_WINDOWS = 20
"""Consecutive non-finite (skipped) windows after which training stops with an error. Isolated skips (a bad
batch, a loss-scale back-off) recover within a few windows; 20 in a row means the run trains nothing."""


class NexusCallback(Callback):
    """Train any automatic-optimization LightningModule with Nexus.

    Inside each gradient-accumulation window (``Trainer(accumulate_grad_batches=K)``) the callback takes
    one small step per micro-batch along its (normalized) gradient and hands the average direction to
    the outer optimizer (whatever ``configure_optimizers`` returns) as its gradient.

    Args:
        inner_lr: γ ≥ 0, the inner step length. With ``normalize=True`` each inner step moves the
            parameters by exactly γ in L2 norm. γ = 0 gives normalized gradient accumulation.
        normalize: normalize each micro-batch gradient by its global L2 norm (Nexus). ``False`` uses raw
            gradients (Fish-style inner SGD); ``normalize=False, inner_lr=0`` is plain accumulation.
        inner_lr_schedule: ``"constant"`` keeps γ fixed; ``"follow_outer"`` scales γ by the outer
            optimizer's current LR relative to its initial LR, so the inner/outer step ratio stays put
            while the LR schedule warms up and decays.
        max_consecutive_skipped_windows: stop training with an error after this many windows in a row were
            skipped for a non-finite gradient (default 20); isolated skips are only counted.
        exact: accumulate Σ d_k in a second fp32 buffer instead of reading G off the weights (see
            :class:`~lightning_nexus.Nexus`; one more fp32 parameter copy; docs/gpu.md has the numbers).

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_nexus import NexusCallback

        trainer = Trainer(max_steps=4, accumulate_grad_batches=4, callbacks=[NexusCallback(inner_lr=0.05)])
        trainer.fit(BoringModel())
    """

    def __init__(
        self,
        inner_lr: float = DEFAULT_INNER_LR,
        normalize: bool = True,
        inner_lr_schedule: Literal["constant", "follow_outer"] = "constant",
        max_consecutive_skipped_windows: int = DEFAULT_MAX_CONSECUTIVE_SKIPPED_WINDOWS,
        exact: bool = False,
    ) -> None:
        if not isinstance(inner_lr, (int, float)) or not math.isfinite(inner_lr) or inner_lr < 0:
            raise ValueError(
                f"NexusCallback(inner_lr={inner_lr!r}): inner_lr must be a finite number >= 0. "
                f"Use a small positive value such as {DEFAULT_INNER_LR}, or 0 for normalized accumulation."
            )
        if inner_lr_schedule not in ("constant", "follow_outer"):
            raise ValueError(
                f"NexusCallback(inner_lr_schedule={inner_lr_schedule!r}): expected 'constant' or 'follow_outer'."
            )
        if not isinstance(max_consecutive_skipped_windows, int) or max_consecutive_skipped_windows < 1:
            raise ValueError(
                f"NexusCallback(max_consecutive_skipped_windows={max_consecutive_skipped_windows!r}): expected an "
                f"integer >= 1 (default {DEFAULT_MAX_CONSECUTIVE_SKIPPED_WINDOWS})."
            )
        self.max_consecutive_skipped_windows = max_consecutive_skipped_windows
        self.consecutive_skipped_windows = 0
        self._trainer: pl.Trainer | None = None  # state_dict() gathers a window's state over the ranks
        self._window_to_resume: dict[str, Any] | None = None
        self.inner_lr = float(inner_lr)
        self.normalize = normalize
        self.inner_lr_schedule = inner_lr_schedule
        self.exact = exact
        self.nexus: Nexus | None = None
        self.skipped_windows = 0
        self.completed_windows = 0
        self._window_sources = WindowSourceCheck()
        self._base_lr: float | None = None
        self._stepped_this_batch = False
        self._inner_displacement = 0.0
        self._validation_stash: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ validation of the setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "NexusCallback drives Lightning's automatic optimization, but this LightningModule sets "
                "`automatic_optimization = False`. With manual optimization call the core directly: "
                "`nexus = lightning_nexus.Nexus(self.parameters(), inner_lr=...)`, then `nexus.inner_step()` "
                "after each `self.manual_backward(loss)` and `nexus.finish_window()` before `opt.step()` "
                "(see README, 'Manual optimization')."
            )
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise RuntimeError(
                "NexusCallback cannot run under DeepSpeed: DeepSpeed accumulates gradients inside its own "
                "engine, so the per-micro-batch gradients Nexus needs never reach Lightning's hooks. "
                "Use strategy='nexus_ddp', or FSDP (ModelParallelStrategy / FSDPStrategy) for sharding."
            )
        if isinstance(strategy, FSDPStrategy) and not isinstance(strategy, NexusStrategy):
            raise RuntimeError(
                f"NexusCallback with the stock {type(strategy).__name__} (FSDP1) would be silently wrong: Lightning "
                "skips the gradient reduce-scatter on non-boundary micro-batches (no_sync), its shards are plain "
                "tensors whose norms the stock strategy does not reduce, and its norm clipping raises. Use "
                "strategy='nexus_fsdp' (lightning_nexus.NexusFSDPStrategy, same arguments as FSDPStrategy), or "
                "FSDP2: ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` in "
                "configure_model (see recipes/*_fsdp.yaml)."
            )
        if isinstance(strategy, DDPStrategy) and not isinstance(strategy, NexusStrategy):
            if strategy.world_size > 1:
                raise RuntimeError(
                    f"NexusCallback with the stock {type(strategy).__name__} and {strategy.world_size} processes "
                    "would let ranks drift apart silently: Lightning skips the gradient all-reduce on "
                    "non-boundary micro-batches, so every rank takes different inner steps. Use "
                    "strategy='nexus_ddp' (lightning_nexus.NexusDDPStrategy; sync='every' for exact semantics "
                    "or sync='window' for one all-reduce per window)."
                )
        accumulating = any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer_callbacks(trainer))
        if trainer.accumulate_grad_batches == 1 and not accumulating:
            rank_zero_warn(
                "NexusCallback with accumulate_grad_batches=1: every window has one micro-batch, so Nexus "
                "degenerates to normalized-gradient training. Set Trainer(accumulate_grad_batches=K) with K >= 2 "
                "(ideally one data source per micro-batch)."
            )
        self._run_hooks_first(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"NexusCallback needs exactly one optimizer, found {len(trainer.optimizers)}. Combine parameter "
                "groups into one optimizer (a composite optimizer for e.g. Muon + AdamW)."
            )
        self._build_nexus(trainer)
        group = trainer.optimizers[0].param_groups[0]
        self._base_lr = float(group.get("initial_lr", group["lr"]))
        if trainer.ckpt_path is not None:
            self._check_weights_finite(trainer, f"loaded from {trainer.ckpt_path}")
            self._warn_if_loader_restarts(trainer)
        self._resume_window(trainer)

    def _build_nexus(self, trainer: pl.Trainer) -> None:
        groups = trainer.optimizers[0].param_groups
        # NexusFSDPStrategy (FSDP1) names the group its plain-tensor shards are spread over; DTensors (FSDP2)
        # carry their own placements, and DDP parameters are whole on every rank
        strategy = trainer.strategy
        group = strategy.nexus_shard_group(_unique_trainable(groups)) if isinstance(strategy, NexusStrategy) else None
        self.nexus = Nexus(
            groups, inner_lr=self.inner_lr, normalize=self.normalize, shard_group=group, exact=self.exact
        )

    def _follow_trainable_set(self, trainer: pl.Trainer) -> None:
        """Rebuild the core at a window start if parameters were (un)frozen since it was built; otherwise
        a newly unfrozen layer would silently get plain accumulation instead of Nexus."""
        assert self.nexus is not None
        current = _unique_trainable(trainer.optimizers[0].param_groups)
        if len(current) != len(self.nexus.params) or any(a is not b for a, b in zip(current, self.nexus.params)):
            self._build_nexus(trainer)

    # ------------------------------------------------------------------ the window
    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nexus = self.nexus
        if nexus is None or not trainer.training:
            return
        if not nexus.in_window:
            self._follow_trainable_set(trainer)
            nexus = self.nexus
            assert nexus is not None  # rebuilt, never removed, while training
            nexus.inner_lr = self._current_inner_lr(trainer)
            self._check_weights_finite(trainer, f"at the start of the window of step {trainer.global_step + 1}")
        scaler = _grad_scaler(trainer)
        # a normalized direction does not depend on the scale; a raw one divides it out on the device
        amp_scale = _device_scale(scaler, pl_module.device) if scaler is not None and not nexus.normalize else 1.0
        # Lightning divided the loss by K on every micro-batch (also in a partial window).
        nexus.inner_step(loss_scale=amp_scale / trainer.accumulate_grad_batches, zero_grad_to_none=scaler is None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        nexus = self.nexus
        if nexus is None or not nexus.in_window:
            return
        result = nexus.finish_window()
        scaler = _grad_scaler(trainer)
        # fused optimizers unscale inside step(): they must be handed G in the scaled domain
        scaled_step = scaler is not None and optimizer_unscales_in_step(optimizer)
        skipped = result.skipped
        if isinstance(trainer.strategy, NexusStrategy):  # e.g. NexusDDPStrategy(sync="window") averages G
            skipped = trainer.strategy.reduce_window(nexus.params, skipped)
        self._count_consecutive_skips(trainer, skipped)
        if skipped:
            self.skipped_windows += 1
            if scaler is None:
                optimizer.zero_grad(set_to_none=True)  # no gradient, no step
            else:
                # Lightning ran scaler.unscale_ before this hook, on the gradients the inner steps had cleared,
                # and recorded them as finite: the core reads its own finite check only in finish_window (no
                # host sync per micro-batch), or only another rank abandoned. Tell the scaler, so that it skips
                # and backs off like a rank that saw the inf (else the ranks' scales diverge).
                _report_overflow(scaler, optimizer, nexus.params)
        else:
            self.completed_windows += 1
            if scaled_step:
                assert scaler is not None
                grads = [_local(p.grad) for p in nexus.params if p.grad is not None]
                torch._foreach_mul_(grads, _device_scale(scaler, grads[0].device))
        self._stepped_this_batch = True
        if not _should_log(trainer):  # self.log costs ~1 ms a call on CPU: only on steps Lightning writes
            return
        pl_module.log("nexus/skipped_windows", float(self.skipped_windows), on_step=True, on_epoch=False)
        pl_module.log("nexus/inner_lr", result.inner_lr, on_step=True, on_epoch=False)
        if not skipped:
            norm = nexus.pseudo_grad_norm()
            if scaled_step:
                assert scaler is not None
                norm /= scaler.get_scale()
            # G = (θ0 − θ_K)/(γn), so the displacement needs no extra pass
            self._inner_displacement = result.inner_lr * result.num_micro_batches * norm
            pl_module.log("nexus/pseudo_grad_norm", norm, on_step=True, on_epoch=False)
            pl_module.log("nexus/inner_displacement", self._inner_displacement, on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        names = source_names(trainer)
        self._window_sources.observe(batch, batch_idx, trainer.accumulate_grad_batches, len(names) if names else None)
        nexus = self.nexus
        if nexus is None or not self._stepped_this_batch:
            return
        self._stepped_this_batch = False
        if nexus.inner_lr > 0 and self._inner_displacement > 0 and _should_log(trainer):
            # the buffer still holds θ0 of the window that just stepped
            outer = nexus.distance_to_anchor()
            if outer > 0:
                pl_module.log("nexus/inner_to_outer_ratio", self._inner_displacement / outer, on_step=True)
        self._inner_displacement = 0.0

    def _current_inner_lr(self, trainer: pl.Trainer) -> float:
        if self.inner_lr_schedule == "constant" or not self._base_lr:
            return self.inner_lr
        return self.inner_lr * float(trainer.optimizers[0].param_groups[0]["lr"]) / self._base_lr

    # ------------------------------------------------------------------ validation sees θ0
    def _run_hooks_first(self, trainer: pl.Trainer) -> None:
        """Move this callback to the front of ``trainer.callbacks``: Lightning calls every hook in list order,
        so from here on each other callback's hooks see what this one has set up (θ0 in the weights during a
        mid-window validation, θ0 in a checkpoint's ``state_dict`` before e.g. WeightAveraging moves it)."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # a list Lightning sets at init
        if callbacks and callbacks[0] is not self:
            # safe while Lightning iterates the list in this very hook: entries after ours keep their index
            callbacks.remove(self)
            callbacks.insert(0, self)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # θ0 stays in the weights from before anyone's on_validation_start until the next training batch, so
        # every callback's validation hooks (WeightAveraging's swaps, checkpoints at on_validation_end) see θ0
        # and whatever they write back into the weights is θ0 again, not the inner point θ_k
        if self._validation_stash is None:
            self._validation_stash = self._swap_in_anchor()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._resume_inner_point()

    def _resume_inner_point(self) -> None:
        """Back to θ_k after a mid-window validation, before any other callback or the next forward runs."""
        self._swap_out_anchor(self._validation_stash)
        self._validation_stash = None

    @contextmanager
    def anchor_as_weights(self) -> Iterator[None]:
        """Mid-window, hold θ0 in the live parameters for the duration (a no-op otherwise): for code that reads
        the weights where this callback cannot edit the result afterwards, e.g. NexusFSDPStrategy gathering an
        FSDP1 state dict from the flat shards."""
        stash = self._swap_in_anchor()
        try:
            yield
        finally:
            self._swap_out_anchor(stash)

    @torch.no_grad()
    def _swap_in_anchor(self) -> list[torch.Tensor] | None:
        nexus = self.nexus
        if nexus is None or not nexus.params_moved:
            return None
        stash = [t.clone() for t in nexus._locals]
        torch._foreach_copy_(nexus._locals, nexus.anchor())
        return stash

    @torch.no_grad()
    def _swap_out_anchor(self, stash: list[torch.Tensor] | None) -> None:
        if stash is not None and self.nexus is not None:
            torch._foreach_copy_(self.nexus._locals, stash)

    # ------------------------------------------------------------------ stopping and checkpoints
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.nexus is not None and self.nexus.in_window:
            rank_zero_warn(
                "Training stopped inside a Nexus window (e.g. max_time or should_stop): the unfinished "
                "window is dropped and the model keeps the weights of the last outer step."
            )
            self.nexus.restore_anchor()
        self._validation_stash = None  # the weights hold θ0, which is what a stopped window keeps

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.nexus is not None:
            self.nexus.restore_anchor()
        self._validation_stash = None

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        nexus = self.nexus
        if nexus is None or not nexus.params_moved or "state_dict" not in checkpoint:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # NexusFSDPStrategy (setup refuses the stock one) gathered the state dict with θ0 in the shards;
            # the entries here are full or re-chunked tensors that local flat-shard anchors cannot replace
            return
        # Mid-window the live weights are a point on the inner trajectory; θ0 pairs with the optimizer state.
        index = {id(p): i for i, p in enumerate(nexus.params)}
        state = checkpoint["state_dict"]
        # Sharded checkpoints hold DTensors on every rank. A full one (FSDP2 with
        # save_distributed_checkpoint=False) holds gathered tensors on rank 0 and nothing elsewhere, so
        # every rank must join the gathers, in the same order, whether or not it keeps the result.
        gather = DTensor is not None and not any(isinstance(v, DTensor) for v in state.values())
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            if id(p) not in index:
                continue
            anchor = nexus.anchor()[index[id(p)]].to(p.dtype)
            if DTensor is not None and isinstance(p, DTensor):
                anchor = DTensor.from_local(anchor, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if gather:
                    anchor = anchor.full_tensor()
            if name in state:
                state[name] = anchor.to(state[name].device).clone()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner_lr": self.inner_lr,
            "normalize": self.normalize,
            "inner_lr_schedule": self.inner_lr_schedule,
            "exact": self.exact,
            "skipped_windows": self.skipped_windows,
            "completed_windows": self.completed_windows,
            "window_position": self.nexus.window_position if self.nexus is not None else 0,
            "consecutive_skipped_windows": self.consecutive_skipped_windows,
            "window": self._window_checkpoint_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_windows = int(state_dict.get("skipped_windows", 0))
        self.completed_windows = int(state_dict.get("completed_windows", 0))
        self.consecutive_skipped_windows = int(state_dict.get("consecutive_skipped_windows", 0))
        self._window_to_resume = state_dict.get("window")

    # ------------------------------------------------------------------ runs that stop when nothing trains
    def _count_consecutive_skips(self, trainer: pl.Trainer, skipped: bool) -> None:
        if not skipped:
            self.consecutive_skipped_windows = 0
            return
        self.consecutive_skipped_windows += 1
        n = self.consecutive_skipped_windows
        if n < self.max_consecutive_skipped_windows:
            return
        last = trainer.global_step + 1  # the step of this window; Lightning increments after the hook
        raise RuntimeError(
            f"NexusCallback: {n} consecutive windows (optimizer steps {last - n + 1}-{last}) had a non-finite "
            f"(NaN/Inf) gradient and were skipped, so the model has not been updated since step {last - n}. "
            "Check the learning rate (outer LR and inner_lr: too high diverges), the data (NaN/Inf or empty "
            "inputs in these batches), the loss scale (16-mixed: the loss overflows fp16; use bf16-mixed) and "
            "the checkpoint the run was resumed from (resume from an earlier one). Isolated skips are tolerated; "
            f"raise NexusCallback(max_consecutive_skipped_windows={self.max_consecutive_skipped_windows}) only if "
            "longer bursts are expected."
        )

    @torch.no_grad()
    def _check_weights_finite(self, trainer: pl.Trainer, when: str) -> None:
        """Refuse non-finite weights at once: every window from them on would only be skipped."""
        nexus = self.nexus
        assert nexus is not None
        # the max-norm cannot overflow and propagates NaN: one reduction per tensor, one host sync per window
        held = [t for t in nexus._locals if t.numel()]  # an FSDP1 rank's flat shard can be empty
        local_finite = not held or bool(torch.stack(torch._foreach_norm(held, float("inf"))).isfinite().all())
        if trainer.strategy.reduce_boolean_decision(local_finite, all=True):
            return
        names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
        bad = [
            f"{names.get(id(p), '?')} ({int((~torch.isfinite(t)).sum())} values)"
            for p, t in zip(nexus.params, nexus._locals)
            if not bool(torch.isfinite(t).all())
        ]
        where = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RuntimeError(
            f"NexusCallback: the weights {when} contain NaN/Inf"
            + (f" in {where}" if bad else " (in another rank's shard)")
            + ". Every window from here would be skipped. If they came from a checkpoint, resume from an "
            "earlier one; otherwise the last outer step diverged: lower the learning rate, check the data and, "
            "with 16-mixed, the loss scale."
        )

    # ------------------------------------------------------------------ resuming a window mid-way
    def _window_checkpoint_state(self) -> dict[str, Any] | None:
        """The unfinished window for ``state_dict``, gathered so that rank 0's copy restores every rank.

        The checkpoint's weights are θ0; this adds the inner point θ_k (Σ d_k with γ = 0) and the counters.
        A process-local trajectory (NexusDDPStrategy(sync="window"), FSDP1 flat shards) is stored per rank;
        DTensor shards (FSDP2) are stored whole; replicated tensors once.
        """
        nexus = self.nexus
        if nexus is None:
            return None
        state = nexus.window_state(live=self._validation_stash)
        if state is not None and self._trainer is not None and self._trainer.world_size > 1:
            # exact mode's Σ d_k is process-local and not gathered here: on resume the core rebuilds it from θ0
            # and θ_k (exact again from the next window on)
            state["direction_sum"] = None
        if state is None or state["inner"] is None:
            return state
        trainer = self._trainer
        local = state["inner"]
        if trainer is not None and trainer.world_size > 1 and _trajectory_is_per_rank(trainer):
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, [t.cpu() for t in local])
            state["inner"] = {"layout": "per_rank", "tensors": gathered}
            return state
        tensors = []
        for p, t in zip(nexus.params, local):
            if DTensor is not None and isinstance(p, DTensor):  # every rank joins, in the same order
                t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            tensors.append(t.cpu())
        state["inner"] = {"layout": "shared", "tensors": tensors}
        return state

    def _resume_window(self, trainer: pl.Trainer) -> None:
        state, self._window_to_resume = self._window_to_resume, None
        nexus = self.nexus
        if state is None or nexus is None:
            return
        position = trainer.fit_loop.epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches
        lost = (
            f"the unfinished window restarts from its θ0 (the checkpoint's weights) with its remaining "
            f"micro-batches, so the {state['window_position']} it had already taken are not trained"
        )
        if not state["abandoned"] and state["window_position"] != position:
            rank_zero_warn(
                f"NexusCallback: the checkpoint was written after micro-batch {state['window_position']} of a "
                f"window, but the resumed loop is at micro-batch {position} of {trainer.accumulate_grad_batches} "
                f"(accumulate_grad_batches changed?): {lost}."
            )
            return
        saved = state["inner"]
        inner = None
        if saved is not None and saved["layout"] == "per_rank":
            if len(saved["tensors"]) != trainer.world_size:
                rank_zero_warn(
                    f"NexusCallback: the checkpoint holds the inner trajectories of {len(saved['tensors'])} ranks, "
                    f"this run has {trainer.world_size}; a rank's own trajectory cannot be split or merged: {lost}."
                )
                return
            inner = saved["tensors"][trainer.global_rank]
        elif saved is not None:
            inner = []
            for p, t in zip(nexus.params, saved["tensors"]):
                if DTensor is not None and isinstance(p, DTensor):  # this rank's shard, no communication
                    t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
                inner.append(t)
        nexus.load_window_state({**state, "inner": inner})

    def _warn_if_loader_restarts(self, trainer: pl.Trainer) -> None:
        """Mid-epoch, a loader without ``state_dict`` is restarted by Lightning at its first batch: say what that
        costs, in batches."""
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        total = trainer.num_training_batches
        if done == 0 or done >= total:
            return
        loaders = _flatten_loaders(trainer.train_dataloader)
        restarting = [
            type(x).__name__ for x in loaders if not (hasattr(x, "state_dict") and hasattr(x, "load_state_dict"))
        ]
        if not restarting:
            return
        epoch = trainer.current_epoch
        if math.isfinite(total):
            rest = (
                f"the rest of epoch {epoch} trains batches 0-{int(total) - done - 1} of the restarted loader instead "
                f"of batches {done}-{int(total) - 1}"
            )
        else:
            rest = f"the rest of epoch {epoch} starts over at batch 0, so its first {done} batches are trained twice"
        rank_zero_warn(
            f"NexusCallback: resuming mid-epoch ({done} batches of epoch {epoch} done) with a train dataloader "
            f"that cannot resume ({', '.join(restarting)} has no state_dict/load_state_dict): {rest}, and the "
            "unfinished window continues on those batches, so the run is not the one the checkpoint came from. "
            "Use a resumable loader (lightning_nexus.data.MixedSourceDataModule, litdata's StreamingDataLoader, "
            "torchdata's StatefulDataLoader) or resume from a checkpoint written at an epoch end."
        )


def _trajectory_is_per_rank(trainer: pl.Trainer) -> bool:
    """Whether each rank's inner trajectory is its own: window-mode DDP, or FSDP1's plain-tensor flat shards."""
    return getattr(trainer.strategy, "sync", None) == "window" or isinstance(trainer.strategy, FSDPStrategy)


def _flatten_loaders(loaders: Any) -> list[Any]:
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten_loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flatten_loaders(v)]
    return [] if loaders is None else [loaders]


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _device_scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The loss scale as a 0-dim tensor where it lives: ``get_scale()`` would be a host sync."""
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))


def _report_overflow(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> None:
    """Make ``scaler`` skip this step and back off, exactly as if it had found an inf in ``.grad`` itself."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:  # a fused optimizer is not unscaled before step(): scaler.step() then checks .grad
        _local(grads[0]).fill_(float("nan"))
    # Otherwise Lightning has already called scaler.unscale_(optimizer), which recorded the gradients as
    # finite; scaler.step() and update() read that record. GradScaler has no public API to amend it.
    mark_overflow(scaler, optimizer)


def _should_log(trainer: pl.Trainer) -> bool:
    # Lightning writes step metrics only when this is True; computing norms on other steps is wasted work.
    return logger_will_write(trainer) and trainer.loggers != []
