"""Model families for the recipes. ``python -m lightning_nexus_recipes.models --table`` prints the size table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from lightning_nexus_recipes.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lightning_nexus_recipes.models.hf import HFCausalLM, HFCausalLMConfig
from lightning_nexus_recipes.models.litgpt import LitGPTConfig, LitGPTModel
from lightning_nexus_recipes.models.llama import LLAMA_PRESETS, Llama, LlamaConfig

ModelConfig: TypeAlias = GPTConfig | LlamaConfig | LitGPTConfig | HFCausalLMConfig
RecipeModel: TypeAlias = GPT | Llama | LitGPTModel | HFCausalLM
"""What ``build_model`` returns; each has ``forward(idx) -> logits``, ``blocks`` (FSDP2 and compile units),
``activation_checkpointing`` and ``reset_parameters`` (after meta-device init)."""

__all__ = [
    "GPT",
    "GPTConfig",
    "HFCausalLM",
    "HFCausalLMConfig",
    "LitGPTConfig",
    "LitGPTModel",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "RecipeModel",
    "build_model",
    "size_table",
]

_MODEL_CLASSES: dict[type, Callable[[Any], RecipeModel]] = {
    GPTConfig: GPT,
    LlamaConfig: Llama,
    LitGPTConfig: LitGPTModel,
    HFCausalLMConfig: HFCausalLM,
}


def build_model(config: ModelConfig) -> RecipeModel:
    """The model for a config: GPT, Llama, a litgpt GPT (``LitGPTConfig``) or a transformers causal LM
    (``HFCausalLMConfig``; the zoo adapters need the ``litgpt`` / ``hf`` extras)."""
    model_class = _MODEL_CLASSES.get(type(config))
    if model_class is None:
        names = ", ".join(c.__name__ for c in _MODEL_CLASSES)
        raise TypeError(f"expected one of {names}, got {type(config).__name__}")
    return model_class(config)


def all_presets() -> list[GPTConfig | LlamaConfig]:
    return [GPTConfig(size=s) for s in GPT_PRESETS] + [LlamaConfig(size=s) for s in LLAMA_PRESETS]


def size_table() -> str:
    """Markdown table of every preset, counts computed from the configs."""
    rows = [
        "| family | size | layers | width | heads (kv) | context | vocab | params | non-embedding | train GFLOP/token |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cfg in all_presets():
        kv = getattr(cfg, "n_kv_head", cfg.n_head)
        rows.append(
            f"| {cfg.family} | {cfg.size} | {cfg.n_layer} | {cfg.n_embd} | {cfg.n_head} ({kv}) | {cfg.block_size} "
            f"| {cfg.vocab_size} | {_human(cfg.num_params())} | {_human(cfg.num_params(non_embedding=True))} "
            f"| {cfg.flops_per_token() / 1e9:.3g} |"
        )
    return "\n".join(rows)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}K"
