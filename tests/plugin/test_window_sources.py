"""NexusCallback warns once per run when the windows defeat Nexus: micro-batches that mix sources, or
windows whose K micro-batches all come from one source."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus.data import per_source_dataloader
from lightning_nexus.window_sources import SINGLE_SOURCE_WINDOWS, WindowSourceCheck


def _samples(n_sources: int = 3, n: int = 48):
    return [{"x": torch.randn(2), "source_id": k} for k in range(n_sources) for _ in range(n)]


class _Module(LightningModule):
    def __init__(self, loader) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.loader = loader

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        return self.lin(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(loader, steps: int) -> list[str]:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NexusCallback(inner_lr=0.01)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Module(loader))
    return [str(w.message) for w in caught if str(w.message).startswith("Nexus:")]


def test_mixed_micro_batches_warn_once_naming_the_fix():
    loader = DataLoader(_samples(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    messages = _fit(loader, steps=4)
    assert len(messages) == 1, messages
    assert "mixes data sources" in messages[0] and "per_source_dataloader" in messages[0]


def test_windows_of_a_single_source_warn_once():
    loader = DataLoader(_samples(), batch_size=2, shuffle=False)  # source 0 for 24 batches, then 1, ...
    messages = _fit(loader, steps=SINGLE_SOURCE_WINDOWS + 2)
    assert len(messages) == 1, messages
    assert "all 3 micro-batches from a single source" in messages[0] and "round_robin" in messages[0]


def test_per_source_round_robin_windows_do_not_warn():
    loader = per_source_dataloader({f"s{k}": _samples(1, 48) for k in range(3)}, batch_size=2, schedule="round_robin")
    assert _fit(loader, steps=SINGLE_SOURCE_WINDOWS + 2) == []


def test_check_ignores_batches_without_source_ids_and_k_of_one():
    check = WindowSourceCheck()
    for i in range(40):
        check.observe({"x": torch.zeros(2)}, i, 3, 3)
        check.observe({"source_id": torch.tensor([0, 0])}, i, 1, 3)
    assert not check.warned_mixed and not check.warned_single
    # one source only in the whole run: nothing to interleave, no warning
    single = WindowSourceCheck()
    for i in range(60):
        single.observe({"source_id": torch.tensor([0, 0])}, i, 3, None)
    assert not single.warned_single
    with pytest.warns(UserWarning, match="single source"):
        for i in range(3 * SINGLE_SOURCE_WINDOWS):
            single.observe({"source_id": torch.tensor([0, 0])}, i, 3, 2)
