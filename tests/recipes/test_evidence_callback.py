"""EvidenceCallback refuses bad settings before training (a bad value must not cost a finished run)."""

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_nexus_recipes.evidence import EvidenceCallback


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hessian_samples": 1}, "hessian_samples must be >= 2"),
        ({"probe_items": 0}, "probe_items must be >= 1"),
        ({"finetune_steps": 0}, "finetune_steps must be >= 1"),
        ({"finetune_lr": 0.0}, "finetune_lr must be > 0"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvidenceCallback(**kwargs)


def test_needs_a_causal_lm_and_the_mixed_source_data(tmp_path):
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EvidenceCallback(diagnostics=False)],
    )
    with pytest.raises(ValueError, match="MixedSourceDataModule"):
        trainer.fit(BoringModel(), datamodule=BoringDataModule())


def test_probes_can_be_switched_off():
    assert EvidenceCallback(probes=False).probes == []
    assert [p.name for p in EvidenceCallback().probes] == ["arith_transfer", "grammar_depth"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alignment_batches": 1}, "alignment_batches must be 0 \\(off\\) or >= 2"),
        ({"transfer_lr": 0.0}, "transfer_lr must be > 0"),
        ({"transfer_points": 0}, "transfer_points must be >= 1"),
    ],
)
def test_bad_alignment_and_transfer_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvidenceCallback(**kwargs)


def test_transfer_needs_a_data_module_with_heldout_training_data(tmp_path):
    from lightning_nexus.data import MixedSourceDataModule
    from lightning_nexus_recipes import CausalLMModule, GPTConfig

    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=1, logger=False, callbacks=[EvidenceCallback(transfer_steps=2)]
    )
    dm = MixedSourceDataModule(block_size=16, batch_size=2, cache_dir=str(tmp_path), corpus_bytes_per_source=20_000)
    module = CausalLMModule(model=GPTConfig(size="tiny", n_layer=1, n_embd=16, n_head=2, block_size=16))
    with pytest.raises(ValueError, match="transfer_batches"):
        trainer.fit(module, datamodule=dm)


def test_on_the_hmm_family_it_logs_like_for_like_cosines_and_writes_transfer_and_the_optimality_gap(tmp_path):
    import json

    from lightning.pytorch.loggers import CSVLogger

    from lightning_nexus_recipes import CausalLMModule, GPTConfig
    from lightning_nexus_recipes.evidence.synthetic import HMMDataModule

    dm = HMMDataModule(block_size=8, batch_size=4, val_batches_per_source=2)
    callback = EvidenceCallback(
        diagnostic_batches=1,
        hessian_samples=2,
        finetune_steps=2,
        alignment_batches=2,
        transfer_steps=4,
        transfer_points=2,
    )
    trainer = Trainer(
        max_steps=4,
        accumulate_grad_batches=3,
        val_check_interval=6,  # micro-batches: validations after optimizer steps 2 and 4
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path, name="", version="v"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    module = CausalLMModule(model=GPTConfig(size="tiny", n_layer=1, n_embd=16, n_head=2, block_size=8), warmup_steps=1)
    trainer.fit(module, datamodule=dm)
    assert [p.name for p in callback.probes] == ["latent_state"]
    metrics = trainer.callback_metrics
    for key in ("cross", "within", "cross_of_means"):
        assert -1 <= float(metrics[f"val/grad_cosine/{key}"]) <= 1
    evidence = json.loads((tmp_path / "v" / "evidence.json").read_text())
    diag = evidence["diagnostics"]
    optimal = dm.optimal_val_loss()
    for name in dm.train_source_names:
        assert diag["optimality_gap"][name] == pytest.approx(float(metrics[f"val/loss/{name}"]) - optimal[name])
    assert diag["optimality_gap"]["max"] == max(diag["optimality_gap"][n] for n in dm.train_source_names)
    assert sorted(evidence["details"]["transfer"]["curve"], key=int) == ["0", "2", "4"]
    assert diag["transfer"]["loss@0"] == pytest.approx(float(metrics["val/loss/hmm_heldout"]), rel=1e-5)
    assert diag["transfer"]["excess@4"] == pytest.approx(diag["transfer"]["loss@4"] - optimal["hmm_heldout"])
    # the final-weights cosines are those of the last validation (same weights, same batches)
    assert diag["grad_alignment"]["cross"] == pytest.approx(float(metrics["val/grad_cosine/cross"]), rel=1e-5)
    probe = evidence["probes"]["latent_state"]
    assert 0 <= probe["chance"] <= probe["ceiling"] <= 1 and 0 <= probe["accuracy"] <= 1
