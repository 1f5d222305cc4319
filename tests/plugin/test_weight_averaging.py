"""Callbacks that read or write the weights during a mid-window validation see θ0, and what they write
survives: EMAWeightAveraging and StochasticWeightAveraging with NexusCallback, in both callback orders,
train exactly as the run without validation."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from tests.helpers import assert_params_close, boring_batches, make_boring

K = 4


class _Record(pl.Callback):
    """Live weights after every outer step, and the weights any validation epoch starts from."""

    def __init__(self):
        self.after_step, self.at_validation, self._seen_step = [], [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._seen_step:
            self._seen_step = trainer.global_step
            self.after_step.append([p.detach().clone() for p in pl_module.parameters()])

    def on_validation_start(self, trainer, pl_module):
        if trainer.training or trainer.state.fn == "fit":
            self.at_validation.append([p.detach().clone() for p in pl_module.parameters()])


def _fit(averaging, nexus_first, validate, epochs=1, n=16):
    module = make_boring()
    record = _Record()
    nexus = NexusCallback(inner_lr=0.1)
    callbacks = [nexus, averaging] if nexus_first else [averaging, nexus]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        accumulate_grad_batches=K,
        callbacks=[*callbacks, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2 if validate else 0,
        val_check_interval=3 if validate else 1.0,  # batches 3, 6, 9: mid-window for K=4
    )
    val = DataLoader(boring_batches(n=2, seed=1), batch_size=None)
    trainer.fit(module, DataLoader(boring_batches(n=n), batch_size=None), val)
    return module, record, averaging


def _ema():
    return EMAWeightAveraging(decay=0.5)


@pytest.mark.parametrize("nexus_first", [True, False])
def test_ema_with_mid_window_validation_trains_as_without_validation(nexus_first):
    plain_module, plain, _ = _fit(_ema(), nexus_first, validate=False)
    module, record, ema = _fit(_ema(), nexus_first, validate=True)
    assert len(record.at_validation) >= 3  # batches 3, 6, 9, ...: mid-window for K=4
    for got, want in zip(record.after_step, plain.after_step, strict=True):  # the training trajectory
        assert_params_close(got, want, rtol=0, atol=0)
    # on_train_end copies the average into the model: the average is the same too
    assert_params_close(list(module.parameters()), list(plain_module.parameters()), rtol=0, atol=0)


def test_validation_callbacks_see_theta0_mid_window():
    """A user's on_validation_start (here the recorder) sees θ0: the weights of the last outer step."""
    _, record, _ = _fit(_ema(), nexus_first=False, validate=True)
    # validation after batch 3 is in window 1: θ0 = initial weights; after batch 6 and 9: after step 1 and 2
    initial = [p.detach().clone() for p in make_boring().parameters()]
    assert_params_close(record.at_validation[0], initial, rtol=0, atol=0)
    assert_params_close(record.at_validation[1], record.after_step[0], rtol=0, atol=0)
    assert_params_close(record.at_validation[2], record.after_step[1], rtol=0, atol=0)


@pytest.mark.parametrize("nexus_first", [True, False])
def test_swa_with_mid_window_validation_trains_as_without_validation(nexus_first):
    def swa():
        return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)

    plain_module, plain, _ = _fit(swa(), nexus_first, validate=False, epochs=3)
    module, record, _ = _fit(swa(), nexus_first, validate=True, epochs=3)
    assert len(record.at_validation) >= 9
    for got, want in zip(record.after_step, plain.after_step, strict=True):
        assert_params_close(got, want, rtol=0, atol=0)
    assert_params_close(list(module.parameters()), list(plain_module.parameters()), rtol=0, atol=0)


def test_training_state_is_restored_after_mid_window_validation():
    """After validation the next micro-batch continues the inner trajectory from θ_k, not from θ0."""
    module = make_boring()
    seen = []

    class _AtBatchStart(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                seen.append([p.detach().clone() for p in pl_module.parameters()])

    class _AtBatchEnd(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                seen.append([p.detach().clone() for p in pl_module.parameters()])

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=[_AtBatchEnd(), _AtBatchStart(), NexusCallback(inner_lr=0.1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(
        module, DataLoader(boring_batches(n=8), batch_size=None), DataLoader(boring_batches(2), batch_size=None)
    )
    inner_point, next_start = seen
    assert_params_close(next_start, inner_point, rtol=0, atol=0)
    assert not torch.equal(inner_point[0], make_boring().layer.weight)
