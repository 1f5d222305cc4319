"""Mid-epoch resume through Lightning checkpoints replays exactly the uninterrupted batch stream."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_nexus.data import MixedSourceDataModule, build_embedded_corpus


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    build_embedded_corpus(d, max_bytes_per_source=20_000, verbose=False)
    return str(d)


class Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        self.seen.append((int(batch["source_id"][0]), int(ids.sum()), int(ids[:, :8].sum())))
        return (self.w * ids.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _dm(cache: str, workers: int) -> MixedSourceDataModule:
    return MixedSourceDataModule(
        cache_dir=cache,
        block_size=32,
        batch_size=2,
        num_workers=workers,
        schedule="weighted",
        corpus_bytes_per_source=20_000,
        val_batches_per_source=0,
        train_batches_per_epoch=12,
    )


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accumulate_grad_batches=3,
        **kw,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, cache, workers):
    full = Recorder()
    _trainer(tmp_path / "full", max_epochs=3, enable_checkpointing=False).fit(full, datamodule=_dm(cache, workers))
    assert len(full.seen) == 36

    # stop after 5 optimizer steps = 15 micro-batches: mid-way through the second epoch
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)
    first = Recorder()
    _trainer(tmp_path / "a", max_epochs=3, max_steps=5, callbacks=[ckpt]).fit(first, datamodule=_dm(cache, workers))
    path = next((tmp_path / "ck").glob("*step=5*.ckpt"))
    second = Recorder()
    _trainer(tmp_path / "b", max_epochs=3, enable_checkpointing=False).fit(
        second, datamodule=_dm(cache, workers), ckpt_path=path
    )
    assert first.seen == full.seen[:15]
    assert second.seen == full.seen[15:]


def test_loader_state_dict_without_trainer(cache):
    dm = _dm(cache, 0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    ref = [b["input_ids"] for b in loader] + [b["input_ids"] for b in loader]  # two epochs
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    fresh = _dm(cache, 0).train_dataloader()
    fresh.load_state_dict(state)
    rest = [b["input_ids"] for b in fresh] + [b["input_ids"] for b in fresh]
    assert len(rest) == len(ref) - 5
    assert all(torch.equal(a, b) for a, b in zip(rest, ref[5:]))
