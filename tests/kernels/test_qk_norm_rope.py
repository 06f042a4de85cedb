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
    run_file_under_interpreter(__file__, 28, exact=True)


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


def _rope_inputs(gen, dtype, tokens, head_dim, max_position, theta, norm=True):
    """Random positions, a default rope table and (with `norm`) q/k-norm weights, on DEVICE."""
    from nanovllm.layers.rotary_embedding import get_rope

    positions = torch.randint(0, max_position, (tokens,), generator=gen).to(DEVICE)
    with torch.device(DEVICE):
        rope = get_rope(head_dim, max_position, {"rope_theta": theta, "rope_type": "default"})
    qw = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm else None
    kw = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE) if norm else None
    return positions, rope.cos_sin_cache, qw, kw


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 2, 16), (3, 6, 1, 32)])  # tokens, q heads, kv heads, head_dim
def test_matches_unfused_ops(dtype, norm, shape) -> None:
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope

    tokens, heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(tokens * 7 + head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    # A strided qkv (a wider buffer's columns), as a quantized projection's output might be.
    base = (torch.randn(tokens, width + 8, generator=gen) * 3).to(dtype).to(DEVICE)
    qkv = base[:, :width]
    positions, cos_sin, qw, kw = _rope_inputs(gen, dtype, tokens, head_dim, 4096, 1e6, norm)
    ref_q, ref_k, ref_v = _reference(qkv.clone(), positions, cos_sin, heads, kv_heads, head_dim, qw, kw, 1e-6)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    padding_before = base[:, width:].clone()
    qk_norm_rope(qkv, positions, cos_sin, heads, kv_heads, head_dim, qw, kw, 1e-6)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    # The sum of squares may round differently: at most a few units in the last place of the dtype.
    atol = {torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(q.float(), ref_q.float(), atol=atol, rtol=1e-2)
    torch.testing.assert_close(k.float(), ref_k.float(), atol=atol, rtol=1e-2)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # V untouched
    assert torch.equal(base[:, width:], padding_before)  # columns past qkv are never written


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8_cache", [False, True])
# tokens, q heads, kv heads, head_dim. The tiny models' 64-element tiles with hundreds of tokens: at 4 warps
# (replicated elements) the H200 stored some K heads wrongly in a few runs of ten.
@pytest.mark.parametrize("shape", [(6, 4, 2, 16), (3, 6, 3, 32), (160, 4, 4, 16), (96, 4, 2, 16)])
def test_cache_store_equals_store_kvcache(dtype, fp8_cache, shape) -> None:
    from nanovllm.kernels.kv_store import store_kvcache
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope

    tokens, heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(tokens * 13 + kv_heads)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width, generator=gen) * 3).to(dtype).to(DEVICE)
    positions, cos_sin, qw, kw = _rope_inputs(gen, dtype, tokens, head_dim, 1024, 1e4)
    block_size = 8
    num_blocks = max(4, 2 * tokens // block_size)
    cache_dtype = torch.float8_e4m3fn if fp8_cache else dtype
    # Distinct slots in shuffled order, one token padded (-1, not stored).
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[1] = -1
    slots = slots.to(DEVICE)
    scales = dict(k_scale=0.5, v_scale=2.0) if fp8_cache else {}

    def caches():
        # A filler value, so that a write to a skipped or wrong slot shows.
        full = torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, device=DEVICE)
        return full.to(cache_dtype), full.to(cache_dtype)

    ref_qkv = qkv.clone()
    qk_norm_rope(ref_qkv, positions, cos_sin, heads, kv_heads, head_dim, qw, kw, 1e-6)
    ref_k_cache, ref_v_cache = caches()
    k = ref_qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = ref_qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    store_kvcache(k, v, ref_k_cache, ref_v_cache, slots, **scales)

    k_cache, v_cache = caches()
    qk_norm_rope(
        qkv,
        positions,
        cos_sin,
        heads,
        kv_heads,
        head_dim,
        qw,
        kw,
        1e-6,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slots,
        **scales,
    )
    assert torch.equal(qkv, ref_qkv)  # q and k in place exactly as without a cache, V untouched
    # Bit-equal caches (compared as raw bytes: FP8 has no elementwise equality on every device).
    assert torch.equal(k_cache.view(torch.uint8), ref_k_cache.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v_cache.view(torch.uint8))
    assert not torch.equal(k_cache.float(), caches()[0].float())  # something was stored


@direct
def test_bad_cache_target_is_value_error() -> None:
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope

    rope_table = torch.zeros(16, 2, 8, device=DEVICE)
    qkv = torch.zeros(2, (2 + 2) * 16, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    slots = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="together"):
        qk_norm_rope(qkv, pos, rope_table, 2, 1, 16, k_cache=cache, v_cache=cache)
    with pytest.raises(ValueError, match="do not match"):
        qk_norm_rope(
            qkv,
            pos,
            rope_table,
            2,
            1,
            16,
            k_cache=cache[:, :, :, :8].contiguous(),
            v_cache=cache[:, :, :, :8].contiguous(),
            slot_mapping=slots,
        )
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope(qkv, pos, rope_table, 2, 1, 16, k_cache=cache, v_cache=cache, slot_mapping=slots[:1])


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


def test_fused_store_only_into_caches_the_backend_shares() -> None:
    """The attention layer offers its cache to the fused kernel only once the cache exists and where
    the backend's cache is the KV-store kernel's layout (Triton here; flash-attn, which needs its
    package); the PyTorch backend and a layer before the cache is bound store K/V themselves."""
    from nanovllm.attention.torch_backend import TorchAttentionBackend
    from nanovllm.attention.triton_backend import TritonAttentionBackend
    from nanovllm.layers.attention import Attention
    from nanovllm.utils.context import AttentionMetadata, ForwardContext

    layer = Attention(4, 16, 0.25, 2)
    layer.forward_context = ForwardContext()
    layer.backend = TritonAttentionBackend()
    assert layer.fused_store_target() is None  # no cache yet (the warm-up pass)
    layer.k_cache = torch.zeros(2, 8, 2, 16)
    layer.v_cache = torch.zeros(2, 8, 2, 16)
    slots = torch.arange(3)
    layer.k_scale = 0.5
    with layer.forward_context.set(AttentionMetadata(is_prefill=False, slot_mapping=slots)):
        target = layer.fused_store_target()
        assert target["k_cache"] is layer.k_cache and target["v_cache"] is layer.v_cache
        assert target["slot_mapping"] is slots and (target["k_scale"], target["v_scale"]) == (0.5, 1.0)
        layer.backend = TorchAttentionBackend()
        assert layer.fused_store_target() is None
