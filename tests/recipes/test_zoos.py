"""litgpt and Hugging Face models in the recipes: built from configs (no download), trained by CausalLMModule,
exported to their zoo's format and loaded back with the zoo's own loader to equal logits."""

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus_recipes.export import export_checkpoint, main
from lightning_nexus_recipes.models import GPTConfig, build_model
from lightning_nexus_recipes.module import CausalLMModule

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BLOCK = 256, 32


def litgpt_config():
    from lightning_nexus_recipes.models.litgpt import LitGPTConfig

    pytest.importorskip("litgpt")
    return LitGPTConfig(name="pythia-14m", fields={"n_layer": 2}, vocab_size=VOCAB, block_size=BLOCK)


def hf_config():
    from lightning_nexus_recipes.models.hf import HFCausalLMConfig

    pytest.importorskip("transformers")
    return HFCausalLMConfig(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vocab_size=VOCAB,
        block_size=BLOCK,
    )


def zoo_loader(kind, out):
    """The zoo's own loader, not ours."""
    if kind == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        return lambda idx: model(input_ids=idx).logits
    from lightning.fabric import Fabric
    from litgpt import GPT, Config
    from litgpt.utils import load_checkpoint

    model = GPT(Config.from_file(out / "model_config.yaml"))
    load_checkpoint(Fabric(accelerator="cpu", devices=1), model, out / "lit_model.pth")
    return model


def batches(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (2, BLOCK + 1), generator=gen)
        out.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]})
    return out


def train_and_save(config, path):
    module = CausalLMModule(model=config, lr=1e-2, warmup_steps=1, max_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=4,
        callbacks=[NexusCallback(inner_lr=0.05)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(batches(), batch_size=None))
    trainer.save_checkpoint(path)
    return module


@pytest.mark.parametrize("kind", ["litgpt", "hf"])
def test_zoo_model_trains_and_exports_to_equal_logits(tmp_path, kind):
    config = litgpt_config() if kind == "litgpt" else hf_config()
    before = build_model(config).state_dict()
    module = train_and_save(config, tmp_path / "model.ckpt")
    trained = module.model.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before), "the optimizer did not move the weights"
    out = export_checkpoint(tmp_path / "model.ckpt", tmp_path / "export")
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(5))
    module.eval()
    with torch.no_grad():
        want = module(idx)
        got = zoo_loader(kind, out)(idx)
    assert got.shape[-1] >= VOCAB
    torch.testing.assert_close(got[..., :VOCAB], want[..., :VOCAB], rtol=0, atol=0)


def test_zoo_configs_fail_early_and_name_the_fix(tmp_path):
    from lightning_nexus_recipes.models.hf import HFCausalLMConfig
    from lightning_nexus_recipes.models.litgpt import LitGPTConfig

    pytest.importorskip("litgpt")
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="must name a model_type"):
        HFCausalLMConfig(config={"hidden_size": 32})
    with pytest.raises(Exception, match="not-a-model"):
        LitGPTConfig(name="not-a-model")
    # a local config directory, read without any download
    hf_config().hf_config().save_pretrained(tmp_path / "cfg")
    from_dir = HFCausalLMConfig(config_dir=str(tmp_path / "cfg"), block_size=16)
    assert from_dir.hf_config().max_position_embeddings == 16 and from_dir.hf_config().vocab_size == VOCAB


@pytest.mark.parametrize("kind", ["litgpt", "hf"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    model = build_model(litgpt_config() if kind == "litgpt" else hf_config())
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.activation_checkpointing = enabled
        model.train()
        model(idx).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["litgpt", "hf"])
def test_meta_device_build_initializes_like_a_fresh_build(kind):
    """The FSDP2 path: built on the meta device, allocated with to_empty, then reset_parameters."""
    config = litgpt_config() if kind == "litgpt" else hf_config()
    fresh = build_model(config)
    torch.manual_seed(0)
    fresh.reset_parameters()  # the same draws as below: every value must come from reset_parameters
    with torch.device("meta"):
        model = build_model(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    want = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        torch.testing.assert_close(t, want[name], rtol=0, atol=0, msg=name)


def test_export_refuses_the_recipes_own_models(tmp_path):
    train_and_save(GPTConfig(size="tiny", block_size=BLOCK, vocab_size=VOCAB), tmp_path / "gpt.ckpt")
    with pytest.raises(TypeError, match="no zoo format"):
        export_checkpoint(tmp_path / "gpt.ckpt", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "kind"), [("litgpt_pythia", "litgpt"), ("hf_llama", "hf")])
def test_zoo_recipe_trains_through_the_cli_and_exports(tmp_path, recipe, kind):
    pytest.importorskip("litgpt" if kind == "litgpt" else "transformers")
    cmd = [
        sys.executable,
        "-m",
        "lightning_nexus",
        "fit",
        "--config",
        f"recipes/{recipe}.yaml",
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "12",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "true",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--data.init_args.corpus_bytes_per_source",
        "100000",
        "--data.init_args.val_batches_per_source",
        "1",
        "--data.init_args.block_size",
        "64",
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val loss after step 3" in proc.stdout, proc.stdout[-2000:]
    (ckpt,) = (tmp_path / "runs").rglob("*.ckpt")
    main([str(ckpt), str(tmp_path / "export")])  # the CLI entry of python -m lightning_nexus_recipes.export
    module = CausalLMModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    idx = torch.randint(0, module.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = module(idx)
        got = zoo_loader(kind, tmp_path / "export")(idx)
    vocab = module.config.vocab_size
    torch.testing.assert_close(got[..., :vocab], want[..., :vocab], rtol=0, atol=0)
