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


# ---------------------------------------------------------------------- the CLI as a user meets it
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_nexus.tools import recipes  # noqa: E402
from lightning_nexus.tools.cli import TOOL_COMMANDS, TRAINER_COMMANDS, unknown_key_message  # noqa: E402

MODEL = "tests.tools.cli_models.ValLossModel"


def _fit(tmp_path, monkeypatch, *extra: str, steps: int = 5):
    monkeypatch.setattr(sys, "argv", ["lightning-nexus"])
    main([
        "fit", "--model", MODEL, "--trainer.max_steps", str(steps), "--trainer.accumulate_grad_batches", "2",
        "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(tmp_path / "runs"), "--trainer.logger.name", "demo", *extra,
    ])  # fmt: skip


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in [*TRAINER_COMMANDS, *TOOL_COMMANDS]:
        assert f"  {name} " in out


def test_mistyped_command_suggests_the_nearest():
    with pytest.raises(SystemExit, match="unknown command 'comapre'; did you mean 'compare'"):
        main(["comapre", "runs/a"])


def test_bare_recipe_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = Path(recipes.resolve_config("quickstart"))
    assert packaged.name == "quickstart.yaml" and packaged.is_file()
    assert recipes.resolve_config("recipes/quickstart.yaml") == str(packaged)  # the clone's path, used elsewhere
    assert recipes.resolve_config("quickstart.yaml") == str(packaged)
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 1\n")
    assert recipes.resolve_config("quickstart.yaml") == "quickstart.yaml"  # a file of the user's wins
    assert recipes.resolve_config("no_such_recipe") == "no_such_recipe"  # LightningCLI reports it
    assert recipes.resolve_config_args(["fit", "--config=quickstart_adamw"])[1].endswith("quickstart_adamw.yaml")


def test_recipes_command_lists_recipes_with_hardware(capsys):
    main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    quick = next(line for line in lines if line.startswith("quickstart "))
    assert "fit" in quick and "CPU" in quick
    assert "experiment" in next(line for line in lines if line.startswith("evidence "))
    assert any(line.startswith("llama_1b ") and "NVIDIA" in line for line in lines)


def test_mistyped_init_arg_is_one_line_naming_the_nearest_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-nexus"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstart", "--data.init_args.blok_size", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: data: 'blok_size' is not an option of lightning_nexus.data.MixedSourceDataModule; "
        "did you mean 'block_size'?"
    ]


def test_unknown_key_message_ignores_other_errors():
    assert unknown_key_message("Parser key \"trainer.max_steps\": Expected a <class 'int'>") is None


def test_fit_ending_between_validations_validates_its_last_step(tmp_path, monkeypatch, capsys):
    _fit(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false", steps=3)  # validations at 2 only
    out = capsys.readouterr().out
    assert "val loss after step 3" in out


def test_non_tty_progress_is_one_line_per_step_report_and_validation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    _fit(tmp_path, monkeypatch, "--trainer.callbacks+=lightning_nexus.NexusCallback", steps=5)  # as the recipes
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "it/s" not in out and "Validation DataLoader" not in out  # no tqdm bars in a log file
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]  # outer steps, not micro-batches
    validations = [line for line in out.splitlines() if line.startswith("validation at step")]
    assert [line.split(":")[0] for line in validations] == ["validation at step 2", "validation at step 4",
                                                            "validation at step 5"]  # fmt: skip


def test_resume_with_ckpt_path_continues_the_same_log_version(tmp_path, monkeypatch):
    _fit(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false", steps=2)
    (ckpt,) = (tmp_path / "runs/demo/version_0/checkpoints").glob("*.ckpt")
    _fit(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt), steps=4)
    assert [p.name for p in (tmp_path / "runs/demo").iterdir()] == ["version_0"]
    assert len(list((tmp_path / "runs/demo/version_0").glob("events.out.tfevents.*"))) == 2


def test_resume_with_ckpt_path_last_finds_the_newest_version_with_a_last_checkpoint(tmp_path, monkeypatch):
    save_last = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true"]
    _fit(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false", *save_last, steps=2)
    assert (tmp_path / "runs/demo/version_0/checkpoints/last.ckpt").exists()
    _fit(tmp_path, monkeypatch, "--trainer.enable_progress_bar", "false", *save_last, "--ckpt_path", "last", steps=4)
    assert [p.name for p in (tmp_path / "runs/demo").iterdir()] == ["version_0"]
    assert torch.load(tmp_path / "runs/demo/version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
