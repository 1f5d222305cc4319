"""Recipe models: parameter counts from first principles, shapes, causality, RoPE and GQA."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_nexus_recipes.models import GPT, GPTConfig, Llama, LlamaConfig, build_model, size_table
from lightning_nexus_recipes.models.llama import apply_rope, rope_cache


def gpt_params(L: int, d: int, V: int, T: int, tied: bool = True, bias: bool = True) -> int:
    # Written out per tensor, independently of GPTConfig.num_params.
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * (2 * d)
    if not bias:
        per_block = 3 * d * d + d * d + 8 * d * d + 2 * d
    return V * d + T * d + L * per_block + (2 * d if bias else d) + (0 if tied else V * d)


def llama_params(L: int, d: int, H: int, KV: int, F_: int, V: int, tied: bool = False) -> int:
    hd = d // H
    per_block = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * F_ + 2 * d
    return V * d + L * per_block + d + (0 if tied else V * d)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (GPTConfig(size="tiny"), gpt_params(4, 128, 256, 256)),
        (
            GPTConfig(size="tiny", tie_embeddings=False, bias=False),
            gpt_params(4, 128, 256, 256, tied=False, bias=False),
        ),
        (GPTConfig(size="gpt2_124m"), gpt_params(12, 768, 50304, 1024)),
        (LlamaConfig(size="tiny"), llama_params(4, 128, 4, 2, 352, 256)),
        (LlamaConfig(size="130m"), llama_params(12, 768, 12, 12, 2048, 32000)),
        (LlamaConfig(size="370m"), llama_params(24, 1024, 16, 16, 2816, 32000)),
        (LlamaConfig(size="1b"), llama_params(16, 2048, 32, 8, 8192, 32000)),
        (LlamaConfig(size="3b"), llama_params(28, 3072, 24, 8, 8192, 32000)),
    ],
    ids=lambda x: getattr(x, "size", ""),
)
def test_param_counts_match_config_and_model(cfg, expected):
    assert cfg.num_params() == expected
    big = expected > 5_000_000
    with torch.device("meta") if big else torch.device("cpu"):  # large sizes: shapes only, no memory
        model = build_model(cfg)
    assert count(model) == expected
    if big:
        assert all(p.is_meta for p in model.parameters())


def test_gpt2_124m_is_gpt2_small():
    # Known count of GPT-2 small with the vocabulary padded to 50304 (nanoGPT reports 124.48M).
    assert GPTConfig(size="gpt2_124m").num_params() == 124_475_904


def test_preset_sizes_are_in_their_named_range():
    for size, lo, hi in [("130m", 120e6, 140e6), ("370m", 350e6, 390e6), ("1b", 0.95e9, 1.2e9), ("3b", 2.8e9, 3.2e9)]:
        assert lo < LlamaConfig(size=size).num_params() < hi, size


@pytest.mark.parametrize("cls, cfg", [(GPT, GPTConfig), (Llama, LlamaConfig)])
def test_shapes_and_causality(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg(size="tiny")).eval()
    x = torch.randint(0, 256, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, 256) and logits.dtype == torch.float32
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % 256  # change only the future
    torch.testing.assert_close(model(y)[:, :20], logits[:, :20])
    assert not torch.allclose(model(y)[:, 20:], logits[:, 20:])


@pytest.mark.parametrize("cls, cfg", [(GPT, GPTConfig), (Llama, LlamaConfig)])
def test_sequence_longer_than_context_is_refused(cls, cfg):
    model = cls(cfg(size="tiny", block_size=16))
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weight_tying():
    tied, untied = GPT(GPTConfig(size="tiny")), Llama(LlamaConfig(size="tiny"))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert Llama(LlamaConfig(size="tiny", tie_embeddings=True)).lm_head.weight is not None


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    cos, sin = rope_cache(64, hd, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m: int, n: int) -> torch.Tensor:
        qs = apply_rope(q.expand(1, 1, 64, hd).contiguous(), cos, sin)[0, 0, m]
        ks = apply_rope(k.expand(1, 1, 64, hd).contiguous(), cos, sin)[0, 0, n]
        return qs @ ks

    torch.testing.assert_close(score(10, 3), score(40, 33))
    torch.testing.assert_close(score(5, 5), q @ k)  # zero offset = no rotation
    assert not torch.allclose(score(10, 3), score(10, 9))
    # A rotation preserves norms.
    rotated = apply_rope(q.expand(1, 1, 64, hd).contiguous(), cos, sin)[0, 0]
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(64))


def test_gqa_matches_repeated_kv_heads():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(size="tiny", n_head=4, n_kv_head=2))
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 128)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    B, T, _ = x.shape
    q = apply_rope(attn.q_proj(x).view(B, T, 4, 32).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, 2, 32).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, 2, 32).transpose(1, 2)
    # Query heads 0,1 share kv head 0; 2,3 share kv head 1.
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = attn.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(attn(x, cos, sin), ref)
    assert attn.k_proj.weight.shape == (64, 128)


def test_meta_materialization_reinitializes_like_fsdp2():
    with torch.device("meta"):
        model = Llama(LlamaConfig(size="tiny"))
    model.to_empty(device="cpu")
    model.reset_parameters()
    ref = Llama(LlamaConfig(size="tiny"))
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    out_std = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(out_std - 0.02 / math.sqrt(8)) < 0.002


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GPTConfig(size="7b"), r"GPTConfig.size='7b'.*gpt2_124m"),
        (lambda: LlamaConfig(size="13b"), r"LlamaConfig.size='13b'.*1b"),
        (lambda: LlamaConfig(size="tiny", n_head=4, n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
        (lambda: GPTConfig(size="tiny", n_head=3), "n_embd=128 must be divisible by n_head=3"),
    ],
)
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_size_table_lists_every_preset():
    table = size_table()
    for name in ("tiny", "gpt2_124m", "130m", "370m", "1b", "3b"):
        assert f"| {name} |" in table
    assert "| llama | 3b | 28 | 3072 | 24 (8) | 2048 | 32000 | 3.02B |" in table
