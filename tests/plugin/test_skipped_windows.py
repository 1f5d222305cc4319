"""A run that trains nothing stops with an error; isolated non-finite windows are only counted."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus.callback import DEFAULT_MAX_CONSECUTIVE_SKIPPED_WINDOWS

K = 2


class Poisoned(LightningModule):
    """Linear regression whose loss is NaN on the micro-batches ``nan_at`` selects."""

    def __init__(self, nan_at=lambda batch_idx: False):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        return loss * float("nan") if self.nan_at(batch_idx) else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, n_batches, callbacks, ckpt_path=None, max_epochs=1):
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        accumulate_grad_batches=K,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    gen = torch.Generator().manual_seed(0)
    trainer.fit(
        module,
        DataLoader([torch.randn(4, 8, generator=gen) for _ in range(n_batches)], batch_size=None),
        ckpt_path=ckpt_path,
    )
    return trainer


def test_default_limit_is_documented_and_bounded():
    assert NexusCallback().max_consecutive_skipped_windows == DEFAULT_MAX_CONSECUTIVE_SKIPPED_WINDOWS <= 50
    with pytest.raises(ValueError, match="max_consecutive_skipped_windows"):
        NexusCallback(max_consecutive_skipped_windows=0)


def test_every_window_non_finite_stops_training_with_an_error():
    module = Poisoned(nan_at=lambda i: True)
    with pytest.raises(RuntimeError) as err:
        _fit(module, 2 * 25, [NexusCallback(max_consecutive_skipped_windows=5)])
    msg = str(err.value)
    assert "5 consecutive windows (optimizer steps 1-5)" in msg
    for what in ("learning rate", "data", "loss scale", "checkpoint", "max_consecutive_skipped_windows=5"):
        assert what in msg
    assert all(torch.isfinite(p).all() for p in module.parameters())  # θ0 kept, nothing corrupted


def test_isolated_skips_are_counted_and_training_goes_on():
    # windows 1, 3, 5, ... (micro-batches 2-3, 6-7, ...) are NaN: never two in a row
    nexus = NexusCallback(max_consecutive_skipped_windows=2)
    trainer = _fit(Poisoned(nan_at=lambda i: (i // K) % 2 == 1), 2 * 10, [nexus])
    assert trainer.global_step == 10 and nexus.skipped_windows == 5 and nexus.completed_windows == 5
    assert nexus.consecutive_skipped_windows == 1


class _PoisonWeightsAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.layer.weight[0, 3] = float("inf")


def test_non_finite_weights_at_a_window_start_are_caught_at_once():
    with pytest.raises(
        RuntimeError,
        match=r"weights at the start of the window of step 3 contain NaN/Inf in "
        r"layer.weight \(1 values\)",
    ):
        _fit(Poisoned(), 2 * 10, [NexusCallback(), _PoisonWeightsAfter(step=2)])


def test_resume_from_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    trainer = _fit(Poisoned(), 4, [NexusCallback()])
    path = tmp_path / "nan.ckpt"
    with torch.no_grad():
        trainer.lightning_module.layer.bias.fill_(float("nan"))
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match=rf"weights loaded from {path} contain NaN/Inf in layer.bias"):
        _fit(Poisoned(), 8, [NexusCallback()], ckpt_path=path, max_epochs=2)
