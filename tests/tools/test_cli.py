"""NexusCLI takes any LightningModule, with or without a DataModule."""

from lightning_nexus.tools.cli import NexusCLI, main


def test_docstring_example_module_without_datamodule():
    cli = NexusCLI(
        args=[
            "--model",
            "lightning.pytorch.demos.boring_classes.BoringModel",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        run=False,
    )
    assert type(cli.model).__name__ == "BoringModel"
    assert cli.datamodule is None


def test_fit_a_module_that_brings_its_own_dataloaders(tmp_path):
    cli = NexusCLI(
        args=[
            "fit",
            "--model",
            "lightning.pytorch.demos.boring_classes.BoringModel",
            "--trainer.max_steps",
            "2",
            "--trainer.accumulate_grad_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.callbacks+=lightning_nexus.NexusCallback",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.global_step == 2
    (nexus,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "NexusCallback"]
    assert nexus.completed_windows == 2


def test_main_routes_compare_before_lightning_parses(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "no_such_run")])
    assert exit_info.value.code == 2  # every run unreadable: named, and a non-zero exit
