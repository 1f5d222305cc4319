"""GPT-2 style decoder: learned positions, pre-LayerNorm, GELU MLP, tied embeddings.

One file, no framework: the architecture of nanoGPT with SDPA attention. Fields of
:class:`GPTConfig` left as ``None`` are filled from the preset named by ``size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Presets: architecture only. ``vocab_size`` 50304 is GPT-2's 50257 rounded up to a multiple of 64
# (faster matmuls); the CLI replaces it by the datamodule's vocabulary.
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=256),
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2_350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
}


@dataclass(frozen=True)
class GPTSizes:
    """The sizes of a :class:`GPTConfig` once its preset has filled the unset ones (``GPTConfig.sizes``)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int


def _filled(value: int | None, name: str) -> int:
    if value is None:  # only if set to None after construction: __post_init__ fills every unset size
        raise ValueError(f"GPTConfig.{name} is None; give it a value or leave it unset to take the preset's")
    return value


@dataclass
class GPTConfig:
    """Shape of a GPT-2 style model.

    Example::

        >>> cfg = GPTConfig(size="tiny")
        >>> (cfg.n_layer, cfg.n_embd)
        (4, 128)
    """

    size: str = "tiny"
    """Preset name (``tiny``, ``gpt2_124m``, ``gpt2_350m``); fields below left unset take its values."""
    n_layer: int | None = None
    """Number of transformer blocks."""
    n_head: int | None = None
    """Attention heads per block."""
    n_embd: int | None = None
    """Hidden width."""
    block_size: int | None = None
    """Context length: the longest sequence the model accepts (size of the position table)."""
    vocab_size: int | None = None
    """Vocabulary size (replaced by the datamodule's when trained through the CLI)."""
    bias: bool = True
    """Biases in linear layers and LayerNorms, as in GPT-2."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0 for pretraining)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (GPT-2 does)."""

    def __post_init__(self) -> None:
        if self.size not in GPT_PRESETS:
            raise ValueError(
                f"GPTConfig.size={self.size!r} is not a known GPT size; choose one of {sorted(GPT_PRESETS)}"
            )
        for key, value in GPT_PRESETS[self.size].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        sizes = self.sizes
        if sizes.n_embd % sizes.n_head:
            raise ValueError(f"GPTConfig.n_embd={sizes.n_embd} must be divisible by n_head={sizes.n_head}")

    @property
    def family(self) -> str:
        return "gpt"

    @property
    def sizes(self) -> GPTSizes:
        """The size fields as ints (read them here: the fields themselves are ``int | None`` for the preset)."""
        return GPTSizes(
            n_layer=_filled(self.n_layer, "n_layer"),
            n_head=_filled(self.n_head, "n_head"),
            n_embd=_filled(self.n_embd, "n_embd"),
            block_size=_filled(self.block_size, "block_size"),
            vocab_size=_filled(self.vocab_size, "vocab_size"),
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (no model is built)."""
        s = self.sizes
        d, b = s.n_embd, int(self.bias)
        attn = d * 3 * d + b * 3 * d + d * d + b * d
        mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
        norms = 2 * (d + b * d)
        blocks = s.n_layer * (attn + mlp + norms)
        final_norm = d + b * d
        if non_embedding:
            return blocks + final_norm
        embed = s.vocab_size * d + s.block_size * d
        head = 0 if self.tie_embeddings else s.vocab_size * d
        return embed + blocks + final_norm + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B convention:
        6 per matmul weight plus the attention score/value products (12·L·d·T, causal masking not credited)."""
        s = self.sizes
        t = seq_len or s.block_size
        matmul_params = self.num_params(non_embedding=True) + s.vocab_size * s.n_embd  # head matmul
        return 6.0 * matmul_params + 12.0 * s.n_layer * s.n_embd * t

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.sizes.n_embd
        self.n_head = config.sizes.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.sizes.n_embd
        self.c_fc = nn.Linear(d, 4 * d, bias=config.bias)
        self.c_proj = nn.Linear(4 * d, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.sizes.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.sizes.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style causal language model returning logits ``[B, T, vocab]``.

    Example::

        >>> model = GPT(GPTConfig(size="tiny"))
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        s = config.sizes
        self.wte = nn.Embedding(s.vocab_size, s.n_embd)
        self.wpe = nn.Embedding(s.block_size, s.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init; residual projections scaled by 1/sqrt(2·n_layer) so the residual stream's
        variance does not grow with depth. Called again after meta-device materialization (FSDP2)."""
        std = 0.02
        n_layer = self.config.sizes.n_layer
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.features(idx))

    def features(self, idx: Tensor) -> Tensor:
        """Final normalized hidden states ``[B, T, n_embd]``: what the output head reads (probes use them)."""
        T, block_size = idx.shape[1], self.config.sizes.block_size
        if T > block_size:
            raise ValueError(f"sequence length {T} exceeds the model context length block_size={block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)
