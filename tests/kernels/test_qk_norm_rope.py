"""The fused q/k-norm + rope kernel against the unfused PyTorch ops it replaces on the GPU.

On a CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before
triton is imported); with CUDA the same tests run directly, in bf16 too. A Qwen3-shaped model is also
run end to end on the GPU: the fused path must give the unfused path's greedy tokens.
"""

import pytest
import torch

from tests.kernels.interpreter import DEVICE, ON_GPU, direct, interpreter_test, run_file_under_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


@interpreter_test
def test_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 10, exact=True)


def _reference(qkv, positions, cache, heads, kv_heads, head_dim, qw, kw, eps):
    from nanovllm.layers.layernorm import rms_norm
    from nanovllm.layers.rotary_embedding import apply_rotary

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(-1, heads, head_dim)
    k = k.reshape(-1, kv_heads, head_dim)
    if qw is not None:
        q, k = rms_norm.fn(q, qw, eps), rms_norm.fn(k, kw, eps)
    q, k = apply_rotary.fn(positions, q, k, cache)
    return q, k, v


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 2, 16), (3, 6, 1, 32)])  # tokens, q heads, kv heads, head_dim
def test_matches_unfused_ops(dtype, norm, shape) -> None:
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm.layers.rotary_embedding import get_rope

    tokens, heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(tokens * 7 + head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    # A strided qkv (a wider buffer's columns), as a quantized projection's output might be.
    base = (torch.randn(tokens, width + 8, generator=gen) * 3).to(dtype).to(DEVICE)
    qkv = base[:, :width]
    positions = torch.randint(0, 4000, (tokens,), generator=gen).to(DEVICE)
    with torch.device(DEVICE):
        rope = get_rope(head_dim, 4096, {"rope_theta": 1e6, "rope_type": "default"})
    qw = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm else None
    kw = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm else None
    ref_q, ref_k, ref_v = _reference(
        qkv.clone(), positions, rope.cos_sin_cache, heads, kv_heads, head_dim, qw, kw, 1e-6
    )
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    padding_before = base[:, width:].clone()
    qk_norm_rope(qkv, positions, rope.cos_sin_cache, heads, kv_heads, head_dim, qw, kw, 1e-6)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    # The sum of squares may round differently: at most a few units in the last place of the dtype.
    atol = {torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(q.float(), ref_q.float(), atol=atol, rtol=1e-2)
    torch.testing.assert_close(k.float(), ref_k.float(), atol=atol, rtol=1e-2)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # V untouched
    assert torch.equal(base[:, width:], padding_before)  # columns past qkv are never written


@direct
def test_bad_shapes_are_value_errors() -> None:
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope

    cache = torch.zeros(16, 2, 8, device=DEVICE)
    qkv = torch.zeros(2, (2 + 2) * 16, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="columns"):
        qk_norm_rope(qkv, pos, cache, 3, 1, 16)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        qk_norm_rope(qkv, pos, cache.double(), 2, 1, 16)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope(qkv, pos, cache, 2, 1, 16, torch.ones(16, device=DEVICE), None)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(qkv, pos[:1], cache, 2, 1, 16)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_attention_forward_equals_unfused(qk_norm) -> None:
    """Qwen3Attention on the GPU (fused) against its own unfused path with the same inputs."""
    from types import SimpleNamespace

    from nanovllm.models.qwen3 import Qwen3Attention

    cfg = SimpleNamespace(
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=1024,
        attention_bias=False,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        attn = Qwen3Attention(cfg, qk_norm=qk_norm)
    for p in attn.parameters():  # the rope table stays float32, as the engine builds it
        p.data = p.data.to(torch.bfloat16).normal_(0, 0.5)
    x = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 4096, (37,), device="cuda")
    qkv = attn.qkv_proj(x)
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    ref_q, ref_k = attn._norm_and_rotate(positions, q.reshape(-1, 16, 128), k.reshape(-1, 8, 128))
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope

    norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if qk_norm else (None, None)
    qk_norm_rope(qkv, positions, attn.rotary_emb.cos_sin_cache, 16, 8, 128, *norm)
    torch.testing.assert_close(
        qkv[:, : attn.q_size].reshape(-1, 16, 128).float(), ref_q.float(), atol=6e-2, rtol=2e-2
    )
    torch.testing.assert_close(
        qkv[:, attn.q_size : attn.q_size + attn.kv_size].reshape(-1, 8, 128).float(),
        ref_k.float(),
        atol=6e-2,
        rtol=2e-2,
    )


def test_fused_path_only_where_the_kernel_applies() -> None:
    """A head size the kernel cannot tile (80, served by flash-attn) or a length-dependent rope keeps
    the unfused ops on the GPU too."""
    from types import SimpleNamespace

    from nanovllm.models.qwen3 import Qwen3Attention

    def attn(head_dim, **rope):
        cfg = SimpleNamespace(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            hidden_size=256,
            attention_bias=False,
            max_position_embeddings=256,
            rope_theta=1e4,
            rms_norm_eps=1e-6,
            **rope,
        )
        return Qwen3Attention(cfg)

    assert attn(128).fused_qk_norm_rope and attn(64).fused_qk_norm_rope
    assert not attn(80).fused_qk_norm_rope
    dynamic = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    assert not attn(128, **dynamic).fused_qk_norm_rope
