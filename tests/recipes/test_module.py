"""CausalLMModule: losses, per-source logging, optimizers (AdamW, Muon composite) and the LR schedule."""

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_nexus_recipes import CausalLMModule, GPTConfig, LlamaConfig, MuonWithAdamW
from lightning_nexus_recipes.module import warmup_cosine


class FakeMixedData(LightningDataModule):
    """Same interface as lightning_nexus.data.MixedSourceDataModule: per-source micro-batches of
    learnable sequences (source s counts up by s+1 modulo 256), two train sources and one OOD source."""

    def __init__(self, block_size: int = 16, batch_size: int = 4, n_batches: int = 64) -> None:
        super().__init__()
        self.block_size, self.batch_size, self.n_batches = block_size, batch_size, n_batches
        self.train_source_names = ["up1", "up2"]
        self.ood_source_names = ["up3"]
        self.source_names = self.train_source_names + self.ood_source_names
        self.val_source_names = self.source_names
        self.vocab_size = 256

    def _batch(self, source: int, gen: torch.Generator) -> dict:
        start = torch.randint(0, 256, (self.batch_size, 1), generator=gen)
        seq = (start + (source + 1) * torch.arange(self.block_size + 1)) % 256
        return {"input_ids": seq[:, :-1], "labels": seq[:, 1:], "source_id": torch.full((self.batch_size,), source)}

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader([self._batch(i % 2, gen) for i in range(self.n_batches)], batch_size=None)

    def val_dataloader(self):
        gen = torch.Generator().manual_seed(1)
        return [DataLoader([self._batch(s, gen) for _ in range(2)], batch_size=None) for s in range(3)]


def fit(module, data, max_steps=10, accumulate=2, **trainer_kwargs):
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def tiny_llama(**kw):
    return LlamaConfig(size="tiny", n_layer=2, block_size=32, **kw)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_decreases_and_schedule_steps_per_optimizer_step(optimizer, tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model=tiny_llama(), optimizer=optimizer, lr=3e-3, warmup_steps=2, max_steps=15)
    data = FakeMixedData()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=15,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=30,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    before = trainer.callback_metrics["val/loss"].item()
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics["val/loss"].item()
    assert trainer.global_step == 15
    assert after < before - 0.5, (before, after)
    opt = trainer.optimizers[0]
    assert isinstance(opt, MuonWithAdamW if optimizer == "muon" else torch.optim.AdamW)
    # 15 scheduler steps (one per optimizer step, not per micro-batch): the cosine has reached its floor.
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * warmup_cosine(15, 2, 15, 0.1))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 15
    # Logged tags: per train source (both appear in each 2-micro-batch window), per val source, OOD.
    metrics = trainer.callback_metrics
    for tag in (
        "train/loss",
        "train/loss/up1",
        "train/loss/up2",
        "train/lr",
        "perf/tokens_per_sec",
        "val/loss/up1",
        "val/loss/up2",
        "val/loss/up3",
        "val/loss/ood",
    ):
        assert tag in metrics, tag
    assert "perf/mfu" not in metrics  # CPU: peak FLOP/s unknown
    torch.testing.assert_close(metrics["val/loss/ood"], metrics["val/loss/up3"])
    torch.testing.assert_close(metrics["val/loss"], (metrics["val/loss/up1"] + metrics["val/loss/up2"]) / 2)
    # The CSV logger received the per-source train losses at logged steps.
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss/up1" in csv.splitlines()[0] and "train/loss/up2" in csv.splitlines()[0]


def test_vocab_size_comes_from_datamodule_and_block_size_is_checked():
    module = CausalLMModule(model=GPTConfig(size="tiny", vocab_size=1000))
    fit(module, FakeMixedData(), max_steps=1, limit_val_batches=0)
    assert module.model.config.vocab_size == 256 and module.hparams.vocab_size == 256

    module = CausalLMModule(model=GPTConfig(size="tiny", block_size=8))
    with pytest.raises(ValueError, match=r"data.block_size=16 exceeds the model context length.*block_size=8"):
        fit(module, FakeMixedData(block_size=16), max_steps=1)


def test_muon_with_adamw_is_one_real_optimizer():
    torch.manual_seed(0)
    module = CausalLMModule(model=tiny_llama(), optimizer="muon")
    module.configure_model()
    from lightning_nexus_recipes.module import _split_muon_params

    muon, other = _split_muon_params(module.model)
    assert all(p.ndim == 2 for p in muon)
    other_ids = {id(p) for p in other}
    assert id(module.model.embed.weight) in other_ids and id(module.model.lm_head.weight) in other_ids
    assert len(muon) == 2 * 7  # q, k, v, o, gate, up, down per block
    opt = MuonWithAdamW(muon, other, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert {g["kind"] for g in opt.param_groups} == {"muon", "adamw"}
    assert all(g["lr"] == 0.005 for g in opt.param_groups)  # the scheduler reached every group
    x = torch.randint(0, 256, (2, 16))
    before = [p.detach().clone() for p in module.model.parameters()]
    module.model(x).logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, module.model.parameters()))
    state = opt.state_dict()
    assert len(state["state"]) == len(muon) + len(other)
    opt.zero_grad()
    assert all(p.grad is None for p in module.model.parameters())
    # Round trip into a fresh optimizer; its inner optimizers must see the loaded state.
    opt2 = MuonWithAdamW(muon, other, lr=0.01)
    opt2.load_state_dict(state)
    assert opt2._muon.state is opt2.state and opt2._muon.param_groups[0] is opt2.param_groups[0]
    torch.testing.assert_close(opt2.state[muon[0]]["momentum_buffer"], opt.state[muon[0]]["momentum_buffer"])


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        CausalLMModule(optimizer="sgd")
    with pytest.raises(ValueError, match="lr=0"):
        CausalLMModule(lr=0)


def test_a_vocabulary_smaller_than_the_data_is_refused_naming_the_source():
    data = FakeMixedData()
    data.max_token_ids = {"up1": 255, "up2": 300}  # e.g. a tokens source written by a larger tokenizer
    module = CausalLMModule(model=GPTConfig(size="tiny"), vocab_size=256)
    with pytest.raises(ValueError, match=r"vocabulary 256 is too small.*source 'up2' holds token id 300.*at least 301"):
        fit(module, data, max_steps=1)
