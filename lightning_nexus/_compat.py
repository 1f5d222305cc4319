"""The one home of private torch / Lightning / litdata access.

Each function below wraps one attribute that upstream does not promise to keep. Every one has a test in
``tests/plugin/test_compat.py`` that exercises the *behaviour* we rely on (not only that the name
exists), so an upgrade that renames or changes one fails there, with the upstream name in the message,
instead of training the wrong thing. Verified on torch 2.14.1, lightning 2.6.6 and litdata 0.2.76; the
pyproject bounds torch below 2.15 until the suite has run on the next release.

``torch._foreach_*`` (the multi-tensor kernels torch's own optimizers use) are documented in torch's API
reference despite the underscore, so the core calls them directly.

Overriding ``FSDPStrategy._setup_model`` (``NexusFSDPStrategy``) is the one private *hook*; it cannot be
wrapped, so ``test_compat.py`` checks its signature and that ``setup`` still calls it.

The ``trainer_*`` accessors wrap *public* Trainer attributes that Lightning assigns from its connectors, so
they carry no annotation a type checker can see; the accessors keep their callers type-checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.nn.parallel import DistributedDataParallel


class UpstreamChanged(RuntimeError):
    """A private upstream attribute this package relies on is gone or changed meaning."""


def _missing(name: str, err: Exception) -> UpstreamChanged:
    return UpstreamChanged(
        f"lightning_nexus relies on the private upstream attribute {name}, which this version no longer has "
        f"({type(err).__name__}: {err}). Install a torch/lightning/litdata version within the bounds of "
        "lightning-nexus's pyproject, or report it."
    )


def logger_will_write(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics at this batch (``trainer._logger_connector.should_update_logs``).

    Lightning has no public twin; computing norms for a step it will not write is wasted work.
    """
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError as err:
        raise _missing("Trainer._logger_connector.should_update_logs", err) from None


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Optimizer steps taken so far, the counter Lightning logs against (``epoch_loop._batches_that_stepped``).

    Unlike ``trainer.global_step`` it does not multiply by the number of optimizers.
    """
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError as err:
        raise _missing("_TrainingEpochLoop._batches_that_stepped", err) from None


def optimizer_unscales_in_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``GradScaler.step`` hands this optimizer its scale instead of unscaling ``.grad`` first.

    True for fused AdamW/Adam/SGD (``optimizer._step_supports_amp_scaling``): such an optimizer must be
    given the gradient in the scaled domain, or it steps 1/scale too small.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def mark_overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Make ``scaler`` skip this optimizer's step and back off, as if it had found an inf itself.

    After ``scaler.unscale_(optimizer)`` recorded the gradients as finite, ``step``/``update`` read that
    record (``GradScaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]``); GradScaler has no
    public API to amend it.
    """
    try:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    except (AttributeError, KeyError) as err:
        raise _missing("GradScaler._per_optimizer_states[...]['found_inf_per_device']", err) from None
    for found_inf in found.values():
        found_inf.fill_(1.0)


def ddp_sync_buffers(ddp: DistributedDataParallel) -> None:
    """Broadcast rank 0's buffers the way DDP does before a forward (``DistributedDataParallel._sync_buffers``).

    DDP's own routine honours ignored buffers, join and buffer hooks, which a plain broadcast would not.
    """
    try:
        sync = ddp._sync_buffers
    except AttributeError as err:
        raise _missing("DistributedDataParallel._sync_buffers", err) from None
    sync()


def fsdp1_managed_params(module: torch.nn.Module) -> list[Tensor]:
    """The flat parameter of an FSDP1 module and its original-parameter views (``_handle.flat_param._params``).

    Empty for a wrapper that owns no parameters of its own. FSDP's own ``clip_grad_norm_`` reads the same.
    """
    handle = getattr(module, "_handle", None)
    if handle is None:
        return []
    try:
        flat = handle.flat_param
        views = flat._params or ()
    except AttributeError as err:
        raise _missing("FullyShardedDataParallel._handle.flat_param._params", err) from None
    return [flat, *views]


def litdata_item_dtype(kind: str, index: int) -> Any:
    """The dtype litdata's ``data_format`` entry ``"<kind>:<index>"`` names (``litdata.constants._*_DTYPES_MAPPING``).

    A numpy dtype for ``no_header_numpy``, a torch dtype for ``no_header_tensor``.
    """
    try:
        from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING
    except ImportError as err:
        raise _missing("litdata.constants._NUMPY_DTYPES_MAPPING/_TORCH_DTYPES_MAPPING", err) from None
    mapping = _NUMPY_DTYPES_MAPPING if kind == "no_header_numpy" else _TORCH_DTYPES_MAPPING
    return mapping[index]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's Trainer, or None when it is not attached (the public ``.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """``trainer.callbacks``: the live list Lightning calls hooks from, so changes to it take effect."""
    return trainer.callbacks  # type: ignore[attr-defined]  # assigned by _CallbackConnector


def trainer_log_every_n_steps(trainer: pl.Trainer) -> int:
    """``Trainer(log_every_n_steps)`` as resolved: 50 when not given, 0 under ``barebones=True``."""
    return trainer.log_every_n_steps  # type: ignore[attr-defined]  # assigned by _LoggerConnector


def trainer_datamodule(trainer: pl.Trainer) -> pl.LightningDataModule | None:
    """``trainer.datamodule``: the DataModule given to ``fit``/``validate``/..., or None."""
    return trainer.datamodule  # type: ignore[attr-defined]  # assigned by _DataConnector


def fabric_forward_module(module: Any) -> torch.nn.Module:
    """The module a Fabric-wrapped model runs its forward through: the ``DistributedDataParallel`` under a
    DDP strategy, the plain module otherwise (``lightning.fabric.wrappers._unwrap_objects``, which reads
    ``_FabricModule._forward_module`` and strips ``torch.compile``). Fabric exposes no public accessor."""
    try:
        from lightning.fabric.wrappers import _unwrap_objects
    except ImportError as err:
        raise _missing("lightning.fabric.wrappers._unwrap_objects", err) from None
    return _unwrap_objects(module)
