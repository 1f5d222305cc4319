"""LLM pretraining recipes for lightning_nexus: GPT/Llama models, ``CausalLMModule`` and YAML configs.

Run one with ``lightning-nexus fit --config recipes/quickstart.yaml``.
"""

from lightning_nexus_recipes.models import GPT, GPTConfig, Llama, LlamaConfig, build_model
from lightning_nexus_recipes.module import CausalLMModule, MuonWithAdamW

__all__ = ["CausalLMModule", "GPT", "GPTConfig", "Llama", "LlamaConfig", "MuonWithAdamW", "build_model"]
