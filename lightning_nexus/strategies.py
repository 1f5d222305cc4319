"""DDP and FSDP1 for Nexus. DDP: exact (all-reduce every micro-batch) or communication-saving (one
all-reduce per window). FSDP1: :class:`NexusFSDPStrategy` (see its docstring).

Stock DDP under gradient accumulation skips the all-reduce on non-boundary micro-batches, so each
rank would take inner steps from its own gradient and the ranks' parameters drift apart. The two modes:

* ``sync="every"``  all-reduce on every micro-batch: all ranks follow one inner trajectory, the result
  equals one process on the global micro-batch. K gradient all-reduces per window.
* ``sync="window"`` never all-reduce inside the window: every rank follows its own inner trajectory
  and only the pseudo-gradient G is averaged, in flat buckets (DiLoCo-like). One all-reduce per window.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.nn import Module
from typing_extensions import override

from lightning_nexus._compat import attached_trainer, fsdp1_managed_params, trainer_callbacks
from lightning_nexus.contract import WindowOwner
from lightning_nexus.replicas import average_pseudo_gradients, broadcast_ddp_buffers

if TYPE_CHECKING:
    import lightning.pytorch as pl


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
        assert self.lightning_module is not None  # configure_ddp runs after the module is connected
        numel = sum(p.numel() for p in self.lightning_module.parameters() if p.requires_grad)
        per_window = "K" if self.sync == "every" else "1"
        rank_zero_info(
            f"NexusDDPStrategy(sync={self.sync!r}): {per_window} all-reduce(s) of {numel * 4 / 2**20:.1f} MiB "
            f"(fp32 gradients, {numel:,} parameters) per window of K micro-batches."
        )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self.sync == "window" and not any(isinstance(cb, WindowOwner) for cb in trainer_callbacks(trainer)):
            raise RuntimeError(
                "NexusDDPStrategy(sync='window') switches DDP's gradient all-reduce off and averages only the "
                "pseudo-gradient that NexusCallback hands over; without NexusCallback the ranks would never "
                "sync. Add NexusCallback, or use sync='every' (or plain 'ddp') for a run without Nexus."
            )
        super().setup(trainer)

    def reduce_window(self, params: list[Tensor], skipped: bool) -> bool:
        """Average the pseudo-gradients in ``.grad`` across ranks and broadcast rank 0's buffers (window
        mode; a no-op in every mode).

        Returns True if any rank skipped its window: then every rank must skip, or they diverge.
        """
        if self.sync != "window" or self.world_size == 1:
            return skipped
        broadcast_ddp_buffers(self.model)  # type: ignore[arg-type]
        return average_pseudo_gradients(params, skipped)

    def nexus_shard_group(self, params: list[Tensor]) -> dist.ProcessGroup | None:
        """None: DDP parameters are whole on every rank."""
        return None


class NexusFSDPStrategy(FSDPStrategy):
    """FSDP1 (:class:`~lightning.pytorch.strategies.FSDPStrategy`) fixed for
    :class:`~lightning_nexus.NexusCallback`:

    * gradients are reduce-scattered on every micro-batch (Lightning's ``no_sync`` on non-boundary
      micro-batches would accumulate *unsharded*, unreduced gradients, which have no global norm);
    * the callback's global norm is all-reduced over the shard group (:meth:`nexus_shard_group`);
    * ``gradient_clip_algorithm="norm"`` works: it goes through the root module's ``clip_grad_norm_``;
    * a mid-window checkpoint holds the window's anchor θ0 (gathered from the shards like the weights);
    * on CPU it runs (gloo), for tests and CPU-only machines.

    Sharding strategies: ``FULL_SHARD``, ``SHARD_GRAD_OP`` and ``NO_SHARD``. Prefer FSDP2
    (``ModelParallelStrategy``) for new work: its DTensor parameters need none of these fixes.

    Args:
        **fsdp_kwargs: everything :class:`~lightning.pytorch.strategies.FSDPStrategy` accepts.

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, strategy=NexusFSDPStrategy(sharding_strategy="FULL_SHARD"),
                          accumulate_grad_batches=4, gradient_clip_val=1.0, callbacks=[NexusCallback()])
    """

    def __init__(self, **fsdp_kwargs: Any) -> None:
        super().__init__(**fsdp_kwargs)
        if self.sharding_strategy not in _NEXUS_SHARDING:
            raise ValueError(
                f"NexusFSDPStrategy(sharding_strategy={self.sharding_strategy.name!r}) is not supported: hybrid "
                "sharding spreads each parameter over an intra-node shard group and replicates it across nodes, "
                "a layout the Nexus tests do not cover. Use FULL_SHARD or SHARD_GRAD_OP, or FSDP2 "
                "(ModelParallelStrategy), whose DTensor placements name the shard dimensions."
            )

    @override
    @contextmanager
    def block_backward_sync(self) -> Generator:
        # Never FSDP's no_sync: it would keep each rank's unreduced, unsharded gradient until the window
        # boundary, while every inner step needs the reduced gradient of its own micro-batch.
        yield None

    def reduce_window(self, params: list[Tensor], skipped: bool) -> bool:
        """G already agrees: every micro-batch's gradient was reduce-scattered."""
        return skipped

    def nexus_shard_group(self, params: list[Tensor]) -> dist.ProcessGroup | None:
        """The process group over which ``params`` (the optimizer's, sharded views or flat parameters) are
        sharded, for :class:`~lightning_nexus.Nexus`'s global norm; ``None`` under ``NO_SHARD``."""
        assert self.model is not None  # asked for by NexusCallback once the model is wrapped
        modules = FullyShardedDataParallel.fsdp_modules(self.model)
        layouts = {(id(m.process_group), m.sharding_strategy) for m in modules}
        if len(layouts) != 1:
            raise RuntimeError(
                "NexusCallback needs all FSDP1 modules to share one process group and sharding strategy "
                f"(found {len(layouts)} combinations): the global norm is all-reduced over a single shard group."
            )
        managed: set[int] = set()
        for m in modules:
            managed.update(id(p) for p in fsdp1_managed_params(m))
        unmanaged = sum(id(p) not in managed for p in params)
        if unmanaged:
            raise RuntimeError(
                f"NexusCallback under FSDP1: {unmanaged} trainable parameter(s) are not managed by FSDP (ignored "
                "modules/states). FSDP does not synchronize their gradients, so ranks would take different inner "
                "steps. Let FSDP manage every trainable parameter, or freeze the ignored ones."
            )
        if modules[0].sharding_strategy == ShardingStrategy.NO_SHARD:
            return None  # whole parameters on every rank, gradients all-reduced: as DDP
        return modules[0].process_group

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if type(self.precision_plugin) is FSDPPrecision:  # the stock plugin raises on norm clipping
            stock = self.precision_plugin
            plugin = _NexusFSDPPrecision(stock.precision, self)
            plugin.scaler = stock.scaler  # FSDPPrecision's constructor would not take it for 16-mixed
            self.precision_plugin = plugin
        super().setup(trainer)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip by the global norm over all shards, as only the root FSDP module can compute it."""
        if not isinstance(self.model, FullyShardedDataParallel):
            raise MisconfigurationException(
                "gradient_clip_algorithm='norm' with NexusFSDPStrategy needs the root module wrapped by FSDP, which "
                "the strategy does unless configure_model already wrapped submodules. Wrap the whole model there, "
                "or clip by value."
            )
        self.model.clip_grad_norm_(max_norm)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # FSDP1 gathers the state dict from its flat shards before any callback sees it, so a mid-window
        # checkpoint gets θ0 by holding it in the shards during the gather (NexusCallback.anchor_as_weights).
        trainer = attached_trainer(self.lightning_module) if self.lightning_module is not None else None
        with ExitStack() as stack:
            for callback in trainer_callbacks(trainer) if trainer is not None else []:
                if isinstance(callback, WindowOwner):
                    stack.enter_context(callback.anchor_as_weights())
            return super().lightning_module_state_dict()

    @override
    def _setup_model(self, model: Module) -> Module:
        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        # Lightning passes device_id=root_device.index, None on CPU, where FSDP1 refuses to run ("FSDP needs a
        # non-CPU accelerator device"); an explicit CPU device makes it run on gloo.
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        policy = self.kwargs.pop("auto_wrap_policy", None)  # applied just now: super would warn and drop it
        try:
            return super()._setup_model(model)  # already wrapped: super finishes (torchmetrics, checkpointing)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator:
        if self.root_device.type != "cpu":
            with super().model_sharded_context():
                yield
            return
        from torch.distributed.fsdp.wrap import enable_wrap

        # `wrap()` in configure_model on CPU: the same device_id fix as _setup_model
        with enable_wrap(
            wrapper_cls=FullyShardedDataParallel,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        ):
            yield


_NEXUS_SHARDING = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP, ShardingStrategy.NO_SHARD)


class _NexusFSDPPrecision(FSDPPrecision):
    """FSDPPrecision whose norm clipping works: ``torch.nn.utils.clip_grad_norm_`` would clip each shard by its
    local norm, so the stock plugin raises; the strategy clips through the root module instead."""

    def __init__(self, precision: Any, strategy: NexusFSDPStrategy) -> None:
        super().__init__(precision)
        self._strategy = strategy

    @override
    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        self._strategy.clip_grad_norm(float(clip_val))


def register_strategies() -> None:
    if "nexus_fsdp" not in StrategyRegistry:
        StrategyRegistry.register(
            "nexus_fsdp", NexusFSDPStrategy, description="FSDP1 for Nexus: reduce-scatter every micro-batch"
        )
    if "nexus_ddp" in StrategyRegistry:
        return
    StrategyRegistry.register(
        "nexus_ddp", NexusDDPStrategy, description="DDP for Nexus, all-reduce every micro-batch", sync="every"
    )
    StrategyRegistry.register(
        "nexus_ddp_window", NexusDDPStrategy, description="DDP for Nexus, one all-reduce per window", sync="window"
    )
    StrategyRegistry.register(
        "nexus_ddp_spawn",
        NexusDDPStrategy,
        description="nexus_ddp with start_method='spawn'",
        sync="every",
        start_method="spawn",
    )


register_strategies()
