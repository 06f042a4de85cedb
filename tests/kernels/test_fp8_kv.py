"""FP8 (e4m3) KV cache in the Triton kernels: the store quantizes (value / scale, saturated), decode and
paged prefill dequantize; against a plain PyTorch fp32 reference over the dequantized cache.

Without CUDA, `test_fp8_kv_kernels_under_triton_interpreter` re-runs this file with TRITON_INTERPRET=1 in
a subprocess (fp32 queries: the interpreter's bf16 dots are wrong); on the GPU in bf16 as well.
"""

import math
import os

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    ON_GPU,
    compile_for_sm90,
    direct,
    interpreter_test,
    run_file_under_interpreter,
)

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@interpreter_test
def test_fp8_kv_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 11, exact=True, timeout=600)


def _quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() / scale).clamp(-448, 448).to(FP8)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_quantizes_with_scale(dtype):
    from nanovllm.kernels.kv_store import store_kvcache

    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, dim = 4, 16, 2, 32
    k = (torch.randn(6, heads, dim, generator=gen) * 3).to(DEVICE, dtype)
    v = (torch.randn(6, heads, dim, generator=gen) * 3).to(DEVICE, dtype)
    k[0, 0, 0] = 5000.0  # saturates at 448 * k_scale
    k_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=FP8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 17, -1, 40, 63, 0], device=DEVICE)
    store_kvcache(k, v, k_cache, v_cache, slots, k_scale=0.5, v_scale=2.0)
    flat_k, flat_v = k_cache.view(-1, heads, dim), v_cache.view(-1, heads, dim)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for got, want in ((flat_k[slot], _quantize(k[i], 0.5)), (flat_v[slot], _quantize(v[i], 2.0))):
            diff = (got.float() - want.float()).abs()
            # round to nearest in both; a tie of the fp32 division may land one e4m3 step apart
            assert (diff > 0).float().mean().item() < 0.02 and torch.all(
                diff <= want.float().abs() / 8 + 2**-9
            )
    assert flat_k[3, 0, 0].float().item() == 448.0
    assert flat_k[2].float().abs().sum().item() == 0  # slot of the skipped token untouched


def _random_fp8_cache(num_blocks, block_size, heads, dim, gen):
    return (
        (torch.randn(num_blocks, block_size, heads, dim, generator=gen) * 4)
        .clamp(-448, 448)
        .to(FP8)
        .to(DEVICE)
    )


def _reference(q, k_cache, v_cache, table, q_pos, num_keys, k_scale, v_scale, scale):
    """fp32 attention of queries at positions q_pos over the first num_keys cached tokens (causal)."""
    block_size = k_cache.shape[1]
    blocks = table[: math.ceil(num_keys / block_size)].long()
    keys = (k_cache[blocks].flatten(0, 1)[:num_keys].float() * k_scale).transpose(0, 1)  # [kv_heads, n, dim]
    values = (v_cache[blocks].flatten(0, 1)[:num_keys].float() * v_scale).transpose(0, 1)
    mask = torch.arange(num_keys, device=q.device)[None, :] <= q_pos[:, None]  # [len_q, n]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)  # [len_q, heads, dim]


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dim", [16, 32])  # 32 and more: V read as 16-bit words; 16: whole
@pytest.mark.parametrize("heads_first", [False, True])  # the launch orders of DECODE_HEADS_FIRST
def test_decode_reads_fp8_cache(dtype, num_splits, dim, heads_first, monkeypatch):
    from nanovllm.kernels import paged_attention
    from nanovllm.kernels.paged_attention import decode_attention

    monkeypatch.setattr(paged_attention, "DECODE_HEADS_FIRST", heads_first)

    gen = torch.Generator().manual_seed(1)
    block_size, kv_heads, heads = 16, 2, 4
    k_cache = _random_fp8_cache(8, block_size, kv_heads, dim, gen)
    v_cache = _random_fp8_cache(8, block_size, kv_heads, dim, gen)
    tables = torch.tensor([[5, 2, 7, -1], [1, -1, -1, -1], [0, 3, 4, 6]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([40, 9, 64], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, heads, dim, generator=gen).to(DEVICE, dtype)
    k_scale, v_scale, scale = 0.05, 0.5, dim**-0.5
    out = decode_attention(
        q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale
    )
    for i in range(3):
        n = int(lens[i])
        ref = _reference(
            q[i : i + 1],
            k_cache,
            v_cache,
            tables[i],
            torch.tensor([n - 1], device=DEVICE),
            n,
            k_scale,
            v_scale,
            scale,
        )
        torch.testing.assert_close(out[i].float(), ref[0], atol=_tol(dtype), rtol=_tol(dtype))


@direct
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_reads_fp8_cache(dtype):
    from nanovllm.kernels.paged_attention import prefill_attention

    gen = torch.Generator().manual_seed(2)
    block_size, kv_heads, heads, dim = 16, 2, 4, 32
    k_cache = _random_fp8_cache(8, block_size, kv_heads, dim, gen)
    v_cache = _random_fp8_cache(8, block_size, kv_heads, dim, gen)
    tables = torch.tensor([[6, 1, 3], [2, 0, -1]], dtype=torch.int32, device=DEVICE)
    q_lens, k_lens = [7, 20], [37, 20]  # sequence 0 has a cached prefix of 30 tokens
    cu_q = torch.tensor([0, 7, 27], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 37, 57], dtype=torch.int32, device=DEVICE)
    q = torch.randn(27, heads, dim, generator=gen).to(DEVICE, dtype)
    k_scale, v_scale, scale = 0.05, 0.5, dim**-0.5
    out = prefill_attention(
        q, k_cache, v_cache, cu_q, cu_k, 20, 37, scale, block_tables=tables, k_scale=k_scale, v_scale=v_scale
    )
    for i in range(2):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        q_pos = torch.arange(k_lens[i] - q_lens[i], k_lens[i], device=DEVICE)
        ref = _reference(q[rows], k_cache, v_cache, tables[i], q_pos, k_lens[i], k_scale, v_scale, scale)
        torch.testing.assert_close(out[rows].float(), ref, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run in the parent")
@pytest.mark.parametrize("q_type", ["bf16", "fp16"])
def test_fp8_decode_compiles_for_sm90_without_byte_gathers(q_type):
    """Compiled for an H200 (no GPU needed): with an FP8 cache and 16-bit queries both dots run in fp16,
    each word of two e4m3 values is widened by one cvt.rn.f16x2.e4m3x2, and nothing is read from shared
    memory a byte at a time (what the V tile of the second dot cost before it was read as words)."""
    from nanovllm.kernels import paged_attention as P

    fn = P._decode_split_kernel
    pointers = dict(q_ptr=q_type, k_cache_ptr="fp8e4nv", v_cache_ptr="fp8e4nv", block_tables_ptr="i32")
    pointers.update(context_lens_ptr="i32", out_ptr=q_type, part_acc_ptr="fp32", part_max_ptr="fp32")
    pointers.update(part_sum_ptr="fp32")
    signature = {name: f"*{t}" for name, t in pointers.items()}
    signature.update(qk_scale="fp32", num_splits="i32", window="i32", v_scale="fp32")
    strides = [name for name in fn.arg_names if name.startswith("stride")]
    signature.update({name: "i32" for name in strides})
    constants = dict(GROUP=2, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=256, TILE_N=128, DOT_PRECISION="tf32")
    constants.update(SINGLE_SPLIT=False, WIDEN_ASM=True, HEADS_FIRST=P.DECODE_HEADS_FIRST)
    ptx = compile_for_sm90(fn, signature, constants, aligned=list(pointers) + strides)["ptx"]
    assert "cvt.rn.f16x2.e4m3x2" in ptx
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx and ".bf16.bf16" not in ptx
    assert "ld.shared.b8" not in ptx and "ld.shared.u8" not in ptx


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run in the parent")
def test_fp8_prefill_compiles_for_sm90_with_fp16_dots():
    """Compiled for an H200 (no GPU needed): paged prefill over an FP8 cache with bf16 queries runs both
    dots in fp16, so each pair of e4m3 values takes one cvt.rn.f16x2.e4m3x2 and no cvt.bf16.f16 after it
    (the old bf16 dots converted every value twice), and nothing is read from shared memory a byte at a
    time; a bf16 cache still runs its dots in bf16."""
    from nanovllm.kernels import paged_attention as P

    fn = P._prefill_kernel
    block_m, block_n, num_warps, num_stages = P._prefill_config(128, torch.bfloat16)

    def ptx(cache_type):
        pointers = dict(q_ptr="bf16", k_ptr=cache_type, v_ptr=cache_type, out_ptr="bf16")
        pointers.update(cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32", block_tables_ptr="i32")
        signature = {name: f"*{t}" for name, t in pointers.items()}
        signature.update(qk_scale="fp32", window="i32", v_scale="fp32")
        strides = [name for name in fn.arg_names if name.startswith("stride")]
        signature.update({name: "i32" for name in strides})
        constants = dict(GROUP=4, BLOCK_M=block_m, TOKENS_PER_TILE=block_m // 4, HEAD_DIM=128)
        constants.update(BLOCK_N=block_n, BLOCK_SIZE=256, PAGED=True, DOT_PRECISION="tf32")
        aligned = list(pointers) + strides
        return compile_for_sm90(fn, signature, constants, aligned, num_warps, num_stages)["ptx"]

    fp8 = ptx("fp8e4nv")
    assert "cvt.rn.f16x2.e4m3x2" in fp8 and "cvt.bf16.f16" not in fp8
    assert ".f32.f16.f16" in fp8 and ".bf16.bf16" not in fp8  # the dots (wgmma on sm_90) in fp16
    assert "ld.shared.b8" not in fp8 and "ld.shared.u8" not in fp8
    assert ".f32.bf16.bf16" in ptx("bf16")


def test_decode_refuses_an_fp8_cache_it_cannot_read_in_words():
    """V is read two e4m3 values at a time: a view starting at an odd byte is refused by name."""
    from nanovllm.kernels.paged_attention import decode_attention

    k_cache = torch.zeros(2, 16, 2, 34, dtype=FP8)[..., 1:33]  # head dim 32, one byte into each row
    v_cache = torch.zeros(2, 16, 2, 34, dtype=FP8)[..., 1:33]
    q = torch.zeros(1, 4, 32)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="FP8 V cache needs even"):
        decode_attention(q, k_cache, v_cache, tables, torch.tensor([20], dtype=torch.int32), 0.1)
