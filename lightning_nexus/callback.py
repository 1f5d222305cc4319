"""NexusCallback: runs the Nexus inner loop inside Lightning's automatic optimization.

Hook mapping (Lightning 2.6, ``accumulate_grad_batches=K``; see DESIGN.md section 3)::

    on_after_backward          every micro-batch: inner step from .grad (Lightning's 1/K and the AMP
                               scale are divided out), then .grad is cleared
    on_before_optimizer_step   window boundary: params := θ0, .grad := G; Lightning then clips .grad
                               and steps the outer optimizer
    on_save_checkpoint         a mid-window checkpoint stores the anchor θ0 as the weights (under FSDP1
                               NexusFSDPStrategy swaps θ0 in while it gathers the state dict instead)
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
from lightning_nexus.core import DTensor, Nexus, _local, _unique_trainable

DEFAULT_INNER_LR = 0.05
"""Default γ. Measured on a 0.84M-parameter GPT with 3 sources, K=3 and AdamW lr 1e-3 (DESIGN.md 8):
γ=0.01 did nothing, 0.05 helped (inner displacement ≈ 0.7× the outer step), 0.2 hurt. The useful range
depends on model size and outer LR: tune γ so that ``nexus/inner_to_outer_ratio`` sits near 0.5-1."""


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

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_nexus import NexusCallback

        trainer = Trainer(max_steps=4, accumulate_grad_batches=4, callbacks=[NexusCallback(inner_lr=0.05)])
        trainer.fit(BoringModel())
    """

    nexus_window_reducer = True  # NexusDDPStrategy(sync="window") requires a callback that calls reduce_window

    def __init__(
        self,
        inner_lr: float = DEFAULT_INNER_LR,
        normalize: bool = True,
        inner_lr_schedule: Literal["constant", "follow_outer"] = "constant",
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
        self.inner_lr = float(inner_lr)
        self.normalize = normalize
        self.inner_lr_schedule = inner_lr_schedule
        self.nexus: Nexus | None = None
        self.skipped_windows = 0
        self.completed_windows = 0
        self._base_lr: float | None = None
        self._stepped_this_batch = False
        self._inner_displacement = 0.0
        self._validation_stash: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ validation of the setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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
        if isinstance(strategy, FSDPStrategy) and not getattr(strategy, "supports_nexus", False):
            raise RuntimeError(
                f"NexusCallback with the stock {type(strategy).__name__} (FSDP1) would be silently wrong: Lightning "
                "skips the gradient reduce-scatter on non-boundary micro-batches (no_sync), its shards are plain "
                "tensors whose norms the stock strategy does not reduce, and its norm clipping raises. Use "
                "strategy='nexus_fsdp' (lightning_nexus.NexusFSDPStrategy, same arguments as FSDPStrategy), or "
                "FSDP2: ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` in "
                "configure_model (see recipes/*_fsdp.yaml)."
            )
        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "supports_nexus", False):
            if strategy.world_size > 1:
                raise RuntimeError(
                    f"NexusCallback with the stock {type(strategy).__name__} and {strategy.world_size} processes "
                    "would let ranks drift apart silently: Lightning skips the gradient all-reduce on "
                    "non-boundary micro-batches, so every rank takes different inner steps. Use "
                    "strategy='nexus_ddp' (lightning_nexus.NexusDDPStrategy; sync='every' for exact semantics "
                    "or sync='window' for one all-reduce per window)."
                )
        accumulating = any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks)
        if trainer.accumulate_grad_batches == 1 and not accumulating:
            rank_zero_warn(
                "NexusCallback with accumulate_grad_batches=1: every window has one micro-batch, so Nexus "
                "degenerates to normalized-gradient training. Set Trainer(accumulate_grad_batches=K) with K >= 2 "
                "(ideally one data source per micro-batch)."
            )

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

    def _build_nexus(self, trainer: pl.Trainer) -> None:
        groups = trainer.optimizers[0].param_groups
        # NexusFSDPStrategy (FSDP1) names the group its plain-tensor shards are spread over; DTensors (FSDP2)
        # carry their own placements, and DDP parameters are whole on every rank
        shard_group = getattr(trainer.strategy, "nexus_shard_group", None)
        group = shard_group(_unique_trainable(groups)) if shard_group is not None else None
        self.nexus = Nexus(groups, inner_lr=self.inner_lr, normalize=self.normalize, shard_group=group)

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
            nexus.inner_lr = self._current_inner_lr(trainer)
        scaler = _grad_scaler(trainer)
        amp_scale = scaler.get_scale() if scaler is not None else 1.0
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
        scaled_step = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        skipped = result.skipped
        reduce_window = getattr(trainer.strategy, "reduce_window", None)
        if reduce_window is not None:  # NexusDDPStrategy(sync="window") averages G and agrees on skips
            skipped = reduce_window(nexus.params, skipped)
        if skipped:
            self.skipped_windows += 1
            if scaler is None:
                optimizer.zero_grad(set_to_none=True)  # no gradient, no step
            elif not result.skipped:
                # Only another rank abandoned: this rank's scaler saw finite gradients and would keep (or
                # grow) its scale while the abandoning rank's backs off, and the ranks' scales diverge.
                _report_overflow(scaler, optimizer, nexus.params)
            # else: the window this rank abandoned left NaN in .grad, so the scaler skips and backs off
        else:
            self.completed_windows += 1
            if scaled_step:
                grads = [_local(p.grad) for p in nexus.params if p.grad is not None]
                torch._foreach_mul_(grads, scaler.get_scale())
        self._stepped_this_batch = True
        if not _should_log(trainer):  # self.log costs ~1 ms a call on CPU: only on steps Lightning writes
            return
        pl_module.log("nexus/skipped_windows", float(self.skipped_windows), on_step=True, on_epoch=False)
        pl_module.log("nexus/inner_lr", result.inner_lr, on_step=True, on_epoch=False)
        if not skipped:
            norm = nexus.pseudo_grad_norm()
            if scaled_step:
                norm /= scaler.get_scale()
            # G = (θ0 − θ_K)/(γn), so the displacement needs no extra pass
            self._inner_displacement = result.inner_lr * result.num_micro_batches * norm
            pl_module.log("nexus/pseudo_grad_norm", norm, on_step=True, on_epoch=False)
            pl_module.log("nexus/inner_displacement", self._inner_displacement, on_step=True, on_epoch=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_stash = self._swap_in_anchor()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.nexus is not None:
            self.nexus.restore_anchor()

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
            "skipped_windows": self.skipped_windows,
            "completed_windows": self.completed_windows,
            # informative: a resumed run always starts a fresh window from the saved θ0
            "window_position": self.nexus.window_position if self.nexus is not None else 0,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_windows = int(state_dict.get("skipped_windows", 0))
        self.completed_windows = int(state_dict.get("completed_windows", 0))


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _report_overflow(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> None:
    """Make ``scaler`` skip this step and back off, exactly as if it had found an inf in ``.grad`` itself."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:  # a fused optimizer is not unscaled before step(): scaler.step() then checks .grad
        _local(grads[0]).fill_(float("nan"))
    # Otherwise Lightning has already called scaler.unscale_(optimizer), which recorded the gradients as
    # finite; scaler.step() and update() read that record. GradScaler has no public API to amend it.
    for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        found_inf.fill_(1.0)


def _should_log(trainer: pl.Trainer) -> bool:
    # Lightning writes step metrics only when this is True; computing norms on other steps is wasted work.
    return bool(trainer._logger_connector.should_update_logs) and trainer.loggers != []
