"""litgpt models in the recipes: any ``litgpt.Config``, by name or by fields, trained by ``CausalLMModule``.

Needs the ``litgpt`` extra (``pip install 'lightning-nexus[litgpt]'``). Nothing is downloaded: a named
config is litgpt's built-in table of architectures, and the weights start from litgpt's own init.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _import_litgpt() -> Any:
    try:
        import litgpt.config
        import litgpt.model
    except ImportError as err:
        raise ImportError(
            f"LitGPTConfig needs litgpt ({err}). Install the extra: pip install 'lightning-nexus[litgpt]'"
        ) from err
    return litgpt


@dataclass
class LitGPTConfig:
    """A litgpt architecture for ``CausalLMModule(model=...)``.

    Example::

        >>> cfg = LitGPTConfig(name="pythia-14m", fields={"n_layer": 2}, vocab_size=256, block_size=64)
        >>> cfg.litgpt_config().n_layer
        2
    """

    name: str | None = None
    """A name from litgpt's config table (``litgpt.Config.from_name``, e.g. ``pythia-14m``); ``None`` builds
    the config from ``fields`` alone."""
    fields: dict[str, Any] = field(default_factory=dict)
    """``litgpt.Config`` fields: with ``name`` they override the named config, without it they are the config."""
    vocab_size: int | None = None
    """Vocabulary size (replaced by the datamodule's when trained through the CLI); the embedding is padded
    to litgpt's ``padding_multiple``."""
    block_size: int | None = None
    """Context length (the rope cache size); ``None`` keeps the config's."""

    family = "litgpt"

    @property
    def size(self) -> str:
        return self.name or "custom"

    def litgpt_config(self) -> Any:
        """The ``litgpt.Config`` this describes."""
        litgpt = _import_litgpt()
        kwargs = dict(self.fields)
        if self.vocab_size is not None:
            # padded_vocab_size of a named config belongs to its own vocabulary: recompute it
            kwargs.update(vocab_size=self.vocab_size, padded_vocab_size=None)
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.name is not None:
            return litgpt.config.Config.from_name(self.name, **kwargs)
        return litgpt.config.Config(**kwargs)

    def __post_init__(self) -> None:
        cfg = self.litgpt_config()  # fail at config time on a bad name or field, not after data loading
        if self.block_size is None:
            self.block_size = cfg.block_size

    def num_params(self, non_embedding: bool = False) -> int:
        with torch.device("meta"):
            model = LitGPTModel(self)
        n = sum(p.numel() for p in model.parameters())
        return n - model.gpt.transformer.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (non-embedding) plus attention, as for the recipe GPT."""
        cfg = self.litgpt_config()
        seq = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq


class LitGPTModel(nn.Module):
    """``litgpt.GPT`` with the recipe-model interface: ``forward(idx) -> logits``, ``blocks`` (FSDP2 units,
    compile units), ``activation_checkpointing`` and ``reset_parameters`` (after meta-device init)."""

    def __init__(self, config: LitGPTConfig) -> None:
        super().__init__()
        litgpt = _import_litgpt()
        self.config = config
        self.gpt = litgpt.model.GPT(config.litgpt_config())
        if not any(p.is_meta for p in self.gpt.parameters()):
            self.reset_parameters()  # the same init as a meta-device (FSDP2) build: litgpt's _init_weights
        self.activation_checkpointing = False
        for block in self.blocks:  # litgpt's own forward stays in charge of rope, masks and softcapping
            block.forward = functools.partial(_maybe_checkpointed, self, block.forward)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.gpt.transformer.h

    def reset_parameters(self) -> None:
        """Initialize after ``to_empty`` (FSDP2 meta-device build): every weight and buffer as a fresh build has
        them (litgpt's own init draws the weights, the norms and the rope cache are reset)."""
        for module in self.gpt.modules():
            if module is not self.gpt and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms (and anything litgpt's _init_weights does not cover)
        self.gpt.apply(self.gpt._init_weights)
        self.gpt.reset_parameters()  # the rope cache

    def forward(self, idx: Tensor) -> Tensor:
        return self.gpt(idx)


def _maybe_checkpointed(owner: LitGPTModel, forward: Any, *args: Any) -> Tensor:
    if owner.activation_checkpointing and owner.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)
