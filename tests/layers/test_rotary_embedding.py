"""Rope scalings against transformers' own rotary embedding modules (the same config), at positions far
beyond the original context: static tables (linear, llama3, yarn and its variants) and the
length-dependent ones (dynamic NTK, longrope), whose frequencies transformers picks from the largest
position of each forward pass."""

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from nanovllm.layers.rotary_embedding import (
    RotaryEmbedding,
    attention_factor,
    check_rope_parameters,
    get_rope,
    rope_lengths,
    rope_max_position,
    rope_parameters,
)

HEAD_DIM = 32
MAX_POS = 64  # the original context: test positions go several times past it

STATIC = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=MAX_POS,
    ),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=MAX_POS),
    "yarn_betas": dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=MAX_POS, beta_fast=16, beta_slow=2
    ),
    "yarn_mscale": dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=MAX_POS,
        mscale=0.707,
        mscale_all_dim=1.0,
    ),
    "yarn_attention_factor": dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=MAX_POS, attention_factor=1.3
    ),
    "yarn_no_truncate": dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=MAX_POS, truncate=False
    ),
}
LONG_FACTORS = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT_FACTORS = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
DYNAMIC = {
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "longrope": dict(
        rope_type="longrope",
        long_factor=LONG_FACTORS,
        short_factor=SHORT_FACTORS,
        original_max_position_embeddings=MAX_POS,
    ),
}


def hf_config(rope: dict, max_pos: int = MAX_POS, **extra):
    params = {"rope_theta": 10000.0, **rope}
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_pos,
        rope_parameters=params,
        **extra,
    )


def hf_cos_sin(rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos, sin `[len, head_dim]` for one forward pass over `positions`."""
    x = torch.zeros(1, len(positions), HEAD_DIM)
    cos, sin = rotary(x, positions[None])
    return cos[0], sin[0]


def rotate_both(ours: RotaryEmbedding, hf_rotary, positions, lengths=None):
    """(ours, transformers') rotated q and k for random q, k at `positions` (one forward pass)."""
    g = torch.Generator().manual_seed(int(positions[0]))
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=g)
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=g)
    oq, ok = ours(positions, q, k, lengths) if ours.length_dependent else ours(positions, q, k)
    cos, sin = hf_cos_sin(hf_rotary, positions)
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    return (oq, ok), (rq[0].transpose(0, 1), rk[0].transpose(0, 1))


@pytest.mark.parametrize("name", list(STATIC))
def test_static_scalings_equal_transformers_far_past_the_original_length(name):
    config = hf_config(STATIC[name])
    params = rope_parameters(config)
    table_len = 16 * MAX_POS
    ours = get_rope(HEAD_DIM, table_len, params)
    hf_rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(0, table_len, 7)
    cos, sin = hf_cos_sin(hf_rotary, positions)
    table = ours.cos_sin_cache[positions]  # [len, 2, head_dim // 2]
    torch.testing.assert_close(table[:, 0], cos[:, : HEAD_DIM // 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table[:, 1], sin[:, : HEAD_DIM // 2], rtol=1e-5, atol=1e-5)
    (oq, ok), (rq, rk) = rotate_both(ours, hf_rotary, positions)
    torch.testing.assert_close(oq, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ok, rk, rtol=1e-5, atol=1e-5)
    # the scaling does something: not the plain table
    plain = RotaryEmbedding(HEAD_DIM, table_len, 10000.0).cos_sin_cache[positions]
    assert (table - plain).abs().max() > 1e-2


def test_yarn_attention_factor_is_folded_into_cos_and_sin():
    params = rope_parameters(hf_config(STATIC["yarn"]))
    assert attention_factor(params) == pytest.approx(0.1 * math.log(4.0) + 1)  # 1.1386
    table = get_rope(HEAD_DIM, 256, params).cos_sin_cache
    norm = table[:, 0] ** 2 + table[:, 1] ** 2  # cos^2 + sin^2 = factor^2
    torch.testing.assert_close(norm, torch.full_like(norm, attention_factor(params) ** 2))
    assert attention_factor(rope_parameters(hf_config(STATIC["yarn_attention_factor"]))) == 1.3
    mscale = attention_factor(rope_parameters(hf_config(STATIC["yarn_mscale"])))
    assert mscale == pytest.approx((0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))


def test_yarn_without_factor_uses_the_length_ratio():
    config = hf_config(
        dict(rope_type="yarn", factor=None, original_max_position_embeddings=MAX_POS), 4 * MAX_POS
    )
    ours = get_rope(HEAD_DIM, 8 * MAX_POS, rope_parameters(config))
    positions = torch.arange(0, 8 * MAX_POS, 5)
    cos, _ = hf_cos_sin(LlamaRotaryEmbedding(config), positions)
    torch.testing.assert_close(
        ours.cos_sin_cache[positions, 0], cos[:, : HEAD_DIM // 2], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", list(DYNAMIC))
def test_length_dependent_scalings_equal_transformers_prompt_then_decode(name):
    """A fresh transformers rope sees a prompt of P tokens in one pass, then one token per pass; ours
    gets each token's length from `rope_lengths` (prompt) or p + 1 (decode), with the prompt chunked."""
    config = hf_config(DYNAMIC[name])
    ours = get_rope(HEAD_DIM, 16 * MAX_POS, rope_parameters(config))
    assert ours.length_dependent and ours.cos_sin_cache is None
    for prompt_len in (40, 3 * MAX_POS + 5):  # within the original length, and far past it
        hf_rotary = LlamaRotaryEmbedding(config)
        positions = torch.arange(prompt_len)
        (oq, ok), (rq, rk) = rotate_both(ours, hf_rotary, positions, torch.tensor([prompt_len] * prompt_len))
        torch.testing.assert_close(oq, rq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ok, rk, rtol=1e-5, atol=1e-5)
        # chunked: the lengths do not depend on the chunks
        chunks = [rope_lengths(s, min(s + 50, prompt_len), prompt_len) for s in range(0, prompt_len, 50)]
        assert sum(chunks, []) == [prompt_len] * prompt_len
        # decode steps past the original length: frequencies move with every step
        for p in range(prompt_len, prompt_len + 2 * MAX_POS, 13):
            (oq, ok), (rq, rk) = rotate_both(ours, hf_rotary, torch.tensor([p]))
            torch.testing.assert_close(oq, rq, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ok, rk, rtol=1e-5, atol=1e-5)
    # a recomputed sequence (prompt then completion tokens in one prefill) keeps each token's length
    assert rope_lengths(0, 10, 6) == [6] * 6 + [7, 8, 9, 10]
    assert rope_lengths(7, 10, 6) == [8, 9, 10]


def test_dynamic_far_lengths_change_the_frequencies():
    ours = get_rope(HEAD_DIM, 1024, rope_parameters(hf_config(DYNAMIC["dynamic"])))
    within = ours.inv_freq_for_lengths(torch.tensor([1, MAX_POS]))
    assert torch.equal(within[0], within[1])  # at or below max_position_embeddings: the plain rope
    far = ours.inv_freq_for_lengths(torch.tensor([4 * MAX_POS]))
    assert (far[0, 1:] < within[0, 1:]).all()  # a larger base: every frequency but the first is lower


def test_longrope_attention_factor_and_checks():
    config = hf_config(DYNAMIC["longrope"], max_pos=4 * MAX_POS)
    params = rope_parameters(config)
    expected = math.sqrt(1 + math.log(4) / math.log(MAX_POS))
    assert attention_factor(params) == pytest.approx(expected)
    _, scaling = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    assert attention_factor(params) == pytest.approx(scaling)
    with pytest.raises(ValueError, match="long_factor has 3 entries"):
        check_rope_parameters({**params, "long_factor": [1.0, 1.0, 1.0]}, HEAD_DIM)
    with pytest.raises(ValueError, match="needs long_factor"):
        check_rope_parameters({k: v for k, v in params.items() if k != "long_factor"})


def test_transformers_4_rope_scaling_fields_read_like_rope_parameters():
    """Older configs: `rope_scaling` (with "type") plus a top-level `rope_theta`."""
    old = SimpleNamespace(
        rope_theta=1e6,
        max_position_embeddings=40960,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )
    params = rope_parameters(old)
    assert params["rope_type"] == "yarn" and params["rope_theta"] == 1e6
    new = SimpleNamespace(
        max_position_embeddings=40960,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    )
    assert rope_max_position(old) == rope_max_position(new) == 131072  # Qwen3's 128K with yarn
    torch.testing.assert_close(
        get_rope(HEAD_DIM, 64, params).cos_sin_cache,
        get_rope(HEAD_DIM, 64, rope_parameters(new)).cos_sin_cache,
    )


def test_model_limit_as_vllm_derives_it():
    assert rope_max_position(hf_config({})) == MAX_POS
    assert rope_max_position(hf_config(STATIC["linear"])) == 4 * MAX_POS
    assert rope_max_position(hf_config(DYNAMIC["dynamic"])) == 3 * MAX_POS
    assert rope_max_position(hf_config(STATIC["llama3"])) == MAX_POS  # already the extended length
    assert rope_max_position(hf_config(DYNAMIC["longrope"], max_pos=256)) == 256
