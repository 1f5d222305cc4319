"""Hugging Face transformers models in the recipes: an ``AutoModelForCausalLM`` built from a config dict or a
local config directory (never downloaded), trained by ``CausalLMModule``.

Needs the ``hf`` extra (``pip install 'lightning-nexus[hf]'``). The weights start from the model's own
random init; ``python -m lightning_nexus_recipes.export`` writes a trained checkpoint back as a
``save_pretrained`` directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"HFCausalLMConfig needs transformers ({err}). Install the extra: pip install 'lightning-nexus[hf]'"
        ) from err
    return transformers


@dataclass
class HFCausalLMConfig:
    """A transformers causal-LM architecture for ``CausalLMModule(model=...)``.

    Example::

        >>> cfg = HFCausalLMConfig(config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2}, vocab_size=256, block_size=64)
        >>> cfg.hf_config().max_position_embeddings
        64
    """

    config: dict[str, Any] = field(default_factory=dict)
    """``transformers.AutoConfig.for_model`` arguments; must name ``model_type`` (``llama``, ``gpt2``, ``qwen2``,
    ...) unless ``config_dir`` is given, in which case they override its fields."""
    config_dir: str | None = None
    """A local directory with a ``config.json`` (e.g. copied from a model repo); read with
    ``local_files_only=True``, so nothing is downloaded."""
    vocab_size: int | None = None
    """Vocabulary size (replaced by the datamodule's when trained through the CLI)."""
    block_size: int | None = None
    """Context length; written to the config's position limit (``max_position_embeddings`` / ``n_positions``)."""

    family = "hf"

    @property
    def size(self) -> str:
        return str(self.config.get("model_type") or (Path(self.config_dir).name if self.config_dir else "custom"))

    def hf_config(self) -> Any:
        """The ``transformers.PretrainedConfig`` this describes."""
        transformers = _import_transformers()
        kwargs = dict(self.config)
        if self.config_dir is not None:
            cfg = transformers.AutoConfig.from_pretrained(self.config_dir, local_files_only=True, **kwargs)
        elif "model_type" not in kwargs:
            raise ValueError(
                "HFCausalLMConfig.config must name a model_type (e.g. {'model_type': 'llama', ...}), or give "
                "config_dir, a local directory holding a config.json."
            )
        else:
            cfg = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        if self.vocab_size is not None:
            cfg.vocab_size = self.vocab_size
        if self.block_size is not None:
            setattr(cfg, _position_field(cfg), self.block_size)
        return cfg

    def __post_init__(self) -> None:
        cfg = self.hf_config()  # fail at config time on a bad model_type or directory
        if self.block_size is None:
            self.block_size = int(getattr(cfg, _position_field(cfg)))

    def num_params(self, non_embedding: bool = False) -> int:
        with torch.device("meta"):
            model = HFCausalLM(self)
        n = sum(p.numel() for p in model.parameters())
        return n - model.hf.get_input_embeddings().weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (non-embedding) plus attention, as for the recipe GPT."""
        cfg = self.hf_config()
        seq = seq_len or self.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def _position_field(cfg: Any) -> str:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if hasattr(cfg, name):
            return name
    raise ValueError(f"{type(cfg).__name__} has no context-length field (max_position_embeddings/n_positions)")


class HFCausalLM(nn.Module):
    """An ``AutoModelForCausalLM`` with the recipe-model interface: ``forward(idx) -> logits``, ``blocks``
    (FSDP2 units, compile units), ``activation_checkpointing`` (transformers' gradient checkpointing) and
    ``reset_parameters`` (after meta-device init)."""

    def __init__(self, config: HFCausalLMConfig) -> None:
        super().__init__()
        transformers = _import_transformers()
        self.config = config
        self.hf = transformers.AutoModelForCausalLM.from_config(config.hf_config())
        self._checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        base = self.hf.base_model
        for name in ("layers", "h", "blocks"):
            layers = getattr(base, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise AttributeError(f"{type(self.hf).__name__}: no decoder-layer list (layers/h/blocks) on its base model")

    @property
    def activation_checkpointing(self) -> bool:
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self._checkpointing = bool(enabled)
        if enabled:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.hf.is_gradient_checkpointing:
            self.hf.gradient_checkpointing_disable()

    def reset_parameters(self) -> None:
        self.hf.apply(self.hf._init_weights)
        self.hf.tie_weights()

    def forward(self, idx: Tensor) -> Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits
