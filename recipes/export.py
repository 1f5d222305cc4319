"""Convert a trained ``CausalLMModule`` checkpoint to its model zoo's own format.

* ``HFCausalLMConfig`` (transformers): a ``save_pretrained`` directory (``config.json`` + safetensors weights),
  loadable with ``AutoModelForCausalLM.from_pretrained(OUT)``.
* ``LitGPTConfig`` (litgpt): litgpt's checkpoint layout, ``lit_model.pth`` + ``model_config.yaml``, loadable
  with ``litgpt.Config.from_file`` / ``litgpt.GPT`` / ``litgpt.utils.load_checkpoint`` (add a tokenizer of
  your choice to use litgpt's generate/evaluate commands on it).

The weights are the checkpoint's ``state_dict``: with NexusCallback that is the last outer step's θ0 (also
in a checkpoint written mid-window), the weights that pair with the optimizer state.

    python -m lightning_nexus_recipes.export runs/hf_llama/version_0/checkpoints/last.ckpt exported/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_nexus_recipes.models.hf import HFCausalLM
from lightning_nexus_recipes.models.litgpt import LitGPTModel
from lightning_nexus_recipes.module import CausalLMModule


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the model of ``checkpoint`` (a Lightning ``.ckpt`` of ``CausalLMModule``) to ``out_dir`` in its
    zoo's format; returns ``out_dir``. Refuses a directory that already holds files, and the recipes' own
    GPT/Llama, which have no zoo format."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"export: no checkpoint file at {checkpoint}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export: {out} is not empty; choose a new directory")
    module = CausalLMModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    model = module.model
    if isinstance(model, HFCausalLM):
        out.mkdir(parents=True, exist_ok=True)
        model.hf.save_pretrained(out)
    elif isinstance(model, LitGPTModel):
        from litgpt.utils import save_config

        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.gpt.state_dict(), out / "lit_model.pth")
        save_config(model.gpt.config, out)
    else:
        raise TypeError(
            f"export: {checkpoint} holds a {type(model).__name__} ({type(module.config).__name__}), which has no zoo "
            "format; export applies to LitGPTConfig and HFCausalLMConfig models. Load the recipe's own models with "
            "CausalLMModule.load_from_checkpoint."
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a CausalLMModule .ckpt written by lightning-nexus fit")
    parser.add_argument("out_dir", help="directory to write (must be new or empty)")
    args = parser.parse_args(argv)
    print(f"exported {args.checkpoint} to {export_checkpoint(args.checkpoint, args.out_dir)}")


if __name__ == "__main__":
    main()
