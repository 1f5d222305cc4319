"""Llama style decoder: RMSNorm, rotary position embedding, SwiGLU MLP, optional grouped-query attention.

One file, no framework. Fields of :class:`LlamaConfig` left as ``None`` are filled from the preset named
by ``size``. The 130m ... 3b presets span the paper's 130M–3B range (shapes of Llama/SmolLM models of
those sizes, with a 32k vocabulary); ``python -m lightning_nexus_recipes.models --table`` prints their exact counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352, block_size=256, vocab_size=256),
    "130m": dict(
        n_layer=12, n_head=12, n_kv_head=12, n_embd=768, intermediate_size=2048, block_size=2048, vocab_size=32000
    ),
    "370m": dict(
        n_layer=24, n_head=16, n_kv_head=16, n_embd=1024, intermediate_size=2816, block_size=2048, vocab_size=32000
    ),
    "1b": dict(
        n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192, block_size=2048, vocab_size=32000
    ),
    "3b": dict(
        n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, intermediate_size=8192, block_size=2048, vocab_size=32000
    ),
}


@dataclass(frozen=True)
class LlamaSizes:
    """The sizes of a :class:`LlamaConfig` once its preset has filled the unset ones (``LlamaConfig.sizes``)."""

    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    intermediate_size: int
    block_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _filled(value: int | None, name: str) -> int:
    if value is None:  # only if set to None after construction: __post_init__ fills every unset size
        raise ValueError(f"LlamaConfig.{name} is None; give it a value or leave it unset to take the preset's")
    return value


@dataclass
class LlamaConfig:
    """Shape of a Llama style model.

    Example::

        >>> cfg = LlamaConfig(size="1b")
        >>> (cfg.n_layer, cfg.n_head, cfg.n_kv_head)
        (16, 32, 8)
    """

    size: str = "tiny"
    """Preset name (``tiny``, ``130m``, ``370m``, ``1b``, ``3b``); fields below left unset take its values."""
    n_layer: int | None = None
    """Number of transformer blocks."""
    n_head: int | None = None
    """Query heads per block."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention when < n_head; must divide n_head)."""
    n_embd: int | None = None
    """Hidden width."""
    intermediate_size: int | None = None
    """Width of the SwiGLU hidden layer."""
    block_size: int | None = None
    """Context length: the longest sequence the model accepts (size of the RoPE table)."""
    vocab_size: int | None = None
    """Vocabulary size (replaced by the datamodule's when trained through the CLI)."""
    rope_base: float = 10000.0
    """RoPE base frequency θ."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head (Llama does not; small models often do)."""

    def __post_init__(self) -> None:
        if self.size not in LLAMA_PRESETS:
            raise ValueError(
                f"LlamaConfig.size={self.size!r} is not a known Llama size; choose one of {sorted(LLAMA_PRESETS)}"
            )
        for key, value in LLAMA_PRESETS[self.size].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        s = self.sizes
        if s.n_embd % s.n_head:
            raise ValueError(f"LlamaConfig.n_embd={s.n_embd} must be divisible by n_head={s.n_head}")
        if s.n_head % s.n_kv_head:
            raise ValueError(f"LlamaConfig.n_kv_head={s.n_kv_head} must divide n_head={s.n_head}")
        if s.head_dim % 2:
            raise ValueError(f"LlamaConfig: head dim n_embd/n_head={s.head_dim} must be even for RoPE")

    @property
    def family(self) -> str:
        return "llama"

    @property
    def sizes(self) -> LlamaSizes:
        """The size fields as ints (read them here: the fields themselves are ``int | None`` for the preset)."""
        return LlamaSizes(
            n_layer=_filled(self.n_layer, "n_layer"),
            n_head=_filled(self.n_head, "n_head"),
            n_kv_head=_filled(self.n_kv_head, "n_kv_head"),
            n_embd=_filled(self.n_embd, "n_embd"),
            intermediate_size=_filled(self.intermediate_size, "intermediate_size"),
            block_size=_filled(self.block_size, "block_size"),
            vocab_size=_filled(self.vocab_size, "vocab_size"),
        )

    @property
    def head_dim(self) -> int:
        return self.sizes.head_dim

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (no model is built)."""
        s = self.sizes
        d, kv = s.n_embd, s.n_kv_head * s.head_dim
        attn = d * d + 2 * d * kv + d * d  # q, k, v, o (no biases)
        mlp = 3 * d * s.intermediate_size  # gate, up, down
        blocks = s.n_layer * (attn + mlp + 2 * d)  # + two RMSNorm weights
        if non_embedding:
            return blocks + d
        head = 0 if self.tie_embeddings else s.vocab_size * d
        return s.vocab_size * d + blocks + d + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM appendix B convention (see ``GPTConfig.flops_per_token``)."""
        s = self.sizes
        t = seq_len or s.block_size
        matmul_params = self.num_params(non_embedding=True) + s.vocab_size * s.n_embd
        return 6.0 * matmul_params + 12.0 * s.n_layer * s.n_embd * t

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cache(seq_len: int, head_dim: int, base: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[seq_len, head_dim/2]`` for the rotary embedding, in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of ``x [B, H, T, h]`` by position-dependent angles
    (the "rotate half" layout of HF Llama, so checkpoints map without permuting weights)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        s = config.sizes
        self.n_head, self.n_kv_head, self.head_dim = s.n_head, s.n_kv_head, s.head_dim
        self.q_proj = nn.Linear(s.n_embd, s.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(s.n_embd, s.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(s.n_embd, s.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_head * self.head_dim, s.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, hidden = config.sizes.n_embd, config.sizes.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.sizes.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.sizes.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Llama style causal language model returning logits ``[B, T, vocab]``.

    Example::

        >>> model = Llama(LlamaConfig(size="tiny"))
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        s = config.sizes
        self.embed = nn.Embedding(s.vocab_size, s.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(s.n_layer))
        self.norm = RMSNorm(s.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Non-persistent buffers: recomputed, never checkpointed, and FSDP2 leaves them unsharded.
        cos, sin = rope_cache(s.block_size, s.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2·n_layer); also rebuilds the
        RoPE tables, which are garbage after a meta-device model is materialized with ``to_empty``."""
        std = 0.02
        s = self.config.sizes
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * s.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_cache(s.block_size, s.head_dim, self.config.rope_base, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.features(idx))

    def features(self, idx: Tensor) -> Tensor:
        """Final normalized hidden states ``[B, T, n_embd]``: what the output head reads (probes use them)."""
        T, block_size = idx.shape[1], self.config.sizes.block_size
        if T > block_size:
            raise ValueError(f"sequence length {T} exceeds the model context length block_size={block_size}")
        x = self.embed(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)
