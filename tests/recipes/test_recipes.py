"""Every recipe YAML parses and instantiates through the CLI (large models on the meta device only),
twins differ only in the callback, and bad input fails with errors that name the key."""

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from lightning_nexus.tools.cli import NexusCLI

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# fit configs only: experiment files (`lightning-nexus experiment`: arms, extends) are tested in test_experiment*
YAMLS = sorted(p.name for p in RECIPES.glob("*.yaml") if not {"arms", "extends"} & set(yaml.safe_load(p.read_text())))
NEXUS_YAMLS = [y for y in YAMLS if "lightning_nexus.NexusCallback" in (RECIPES / y).read_text()]
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def instantiate(name: str, *extra: str) -> NexusCLI:
    if name.startswith("litgpt"):  # the litgpt extra is not in `test` (its pins would downgrade jsonargparse)
        pytest.importorskip("litgpt")
    cfg = yaml.safe_load((RECIPES / name).read_text())
    overrides = [] if cfg["trainer"].get("accelerator") == "cpu" else CPU_OVERRIDES
    args = ["--config", str(RECIPES / name), *overrides, "--trainer.logger", "false", *extra]
    with mock.patch.object(sys, "argv", ["lightning-nexus"]):  # args= replaces argv; silence Lightning's warning
        return NexusCLI(args=args, run=False, save_config_callback=None)


def twin_of(name: str) -> str:
    return name.replace(".yaml", "_baseline.yaml" if "_muon" in name else "_adamw.yaml")


def test_recipe_set_is_complete():
    for base in ("gpt2_124m", "llama_130m", "llama_1b", "llama_3b"):
        assert f"{base}.yaml" in YAMLS and f"{base}_fsdp.yaml" in YAMLS
    assert {"quickstart.yaml", "llama_130m_muon.yaml"} <= set(YAMLS)
    for name in NEXUS_YAMLS:
        assert twin_of(name) in YAMLS, name


@pytest.mark.parametrize("name", YAMLS)
def test_recipe_header_names_hardware_and_throughput(name):
    head = (RECIPES / name).read_text().splitlines()[:3]
    assert head[0].startswith("# ") and any("Target hardware:" in line for line in head), head
    assert any("throughput" in line.lower() for line in head), head


@pytest.mark.parametrize("name", YAMLS)
def test_recipe_instantiates_without_allocating_the_model(name):
    cli = instantiate(name)
    module, cfg = cli.model, cli.model.config
    assert type(module).__name__ == "CausalLMModule" and module.model is None  # built in configure_model
    assert type(cli.datamodule).__name__ == "MixedSourceDataModule"
    assert cli.datamodule.block_size <= cfg.block_size
    callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    assert ("NexusCallback" in callbacks) == (name in NEXUS_YAMLS)
    raw = yaml.safe_load((RECIPES / name).read_text())
    assert cli.trainer.accumulate_grad_batches == raw["trainer"]["accumulate_grad_batches"] == 4
    if raw["trainer"].get("accelerator") == "gpu":
        assert raw["trainer"]["precision"] == "bf16-mixed" and raw["model"]["init_args"]["compile"] is True
    if "_fsdp" in name:
        assert raw["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
    # The architecture, on the meta device: shapes and counts without memory.
    with torch.device("meta"):
        model = module._build()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def strip_run_name(cfg: dict) -> dict:
    cfg["trainer"]["logger"]["init_args"].pop("name")
    cfg["trainer"].pop("callbacks")
    return cfg


@pytest.mark.parametrize("name", NEXUS_YAMLS)
def test_baseline_twin_differs_only_in_the_callback(name):
    nexus = yaml.safe_load((RECIPES / name).read_text())
    twin = yaml.safe_load((RECIPES / twin_of(name)).read_text())
    nexus_callbacks = nexus["trainer"]["callbacks"]
    assert [c["class_path"] for c in nexus_callbacks].count("lightning_nexus.NexusCallback") == 1
    # the twin keeps every other callback (e.g. the gradient-similarity monitor), so both get the same curves
    assert twin["trainer"]["callbacks"] == [
        c for c in nexus_callbacks if c["class_path"] != "lightning_nexus.NexusCallback"
    ]
    assert strip_run_name(nexus) == strip_run_name(twin)


def test_muon_recipe_selects_muon():
    assert instantiate("llama_130m_muon.yaml").model.optimizer_name == "muon"


def test_nexus_strategy_by_name_and_callback_by_class_path():
    cli = instantiate(
        "quickstart_adamw.yaml",
        "--trainer.strategy",
        "nexus_ddp",
        "--trainer.callbacks+=lightning_nexus.NexusCallback",
        "--trainer.callbacks.inner_lr",
        "0.1",
    )
    assert type(cli.trainer.strategy).__name__ == "NexusDDPStrategy"
    (nexus,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NexusCallback"]
    assert nexus.inner_lr == 0.1


# ------------------------------------------------------------------------------------------ bad input
def test_typo_in_config_names_the_key(capsys):
    with pytest.raises(SystemExit):
        instantiate("quickstart.yaml", "--model.init_args.lrr", "0.1")
    assert "lrr" in capsys.readouterr().err


def test_typo_in_model_config_names_the_key(capsys):
    with pytest.raises(SystemExit):
        instantiate("quickstart.yaml", "--model.init_args.model.init_args.n_layers", "3")
    assert "n_layers" in capsys.readouterr().err


def test_unknown_model_size_names_the_choices(capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        instantiate("quickstart.yaml", "--model.init_args.model.init_args.size", "huge")
    text = str(err.value) + capsys.readouterr().err
    assert "size='huge'" in text and "gpt2_124m" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_recipe_on_cpu_is_refused_with_the_fix():
    with pytest.raises(
        SystemExit, match=r"trainer.accelerator='gpu' \(strategy '.*ModelParallelStrategy'\) but no CUDA"
    ):
        with mock.patch.object(sys, "argv", ["lightning-nexus"]):
            NexusCLI(args=["--config", str(RECIPES / "llama_1b_fsdp.yaml")], run=False)


def test_block_size_beyond_context_is_refused_at_setup():
    cli = instantiate("quickstart.yaml", "--data.init_args.block_size", "512")
    cli.model.trainer = cli.trainer
    cli.trainer.datamodule = cli.datamodule  # what Trainer.fit attaches before setup
    with pytest.raises(ValueError, match=r"data.block_size=512 exceeds the model context length.*block_size=256"):
        cli.model.setup("fit")
