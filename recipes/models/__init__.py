"""Model families for the recipes. ``python -m lightning_nexus_recipes.models --table`` prints the size table."""

from __future__ import annotations

from torch import nn

from lightning_nexus_recipes.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lightning_nexus_recipes.models.llama import LLAMA_PRESETS, Llama, LlamaConfig

ModelConfig = GPTConfig | LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "ModelConfig", "build_model", "size_table"]


def build_model(config: ModelConfig) -> nn.Module:
    """The model class for a config (GPT for ``GPTConfig``, Llama for ``LlamaConfig``)."""
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, LlamaConfig):
        return Llama(config)
    raise TypeError(f"expected GPTConfig or LlamaConfig, got {type(config).__name__}")


def all_presets() -> list[ModelConfig]:
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
