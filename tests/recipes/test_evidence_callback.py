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
