"""Triton kernel that writes new K/V rows into the paged KV cache (FP8 caches: quantized on store)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.fp8_cast import emulate_cast, to_fp8

FP8_CACHE_DTYPE = torch.float8_e4m3fn

# One program copies one token (all of its KV heads). The rows are small (num_kv_heads * head_dim
# elements, 2 KiB for Qwen3-0.6B in bf16), so a single warp-group is plenty.
STORE_NUM_WARPS = 4


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    k_scale_inv,
    v_scale_inv,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,
    EMULATE_CAST: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    token64 = token.to(tl.int64)
    # Source rows may be strided views (e.g. slices of a fused qkv projection); the last dim is contiguous.
    key_offsets = token64 * stride_key_token + heads[:, None] * stride_key_head + dims[None, :]
    value_offsets = token64 * stride_value_token + heads[:, None] * stride_value_head + dims[None, :]
    # The cache is contiguous: a slot holds NUM_KV_HEADS * HEAD_DIM consecutive elements.
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(key_ptr + key_offsets, mask=mask)
    v = tl.load(value_ptr + value_offsets, mask=mask)
    if FP8:  # e4m3 cache: value / scale, saturated at +-448 (vLLM's per-tensor KV scale)
        k = to_fp8(k.to(tl.float32) * k_scale_inv, EMULATE_CAST)
        v = to_fp8(v.to(tl.float32) * v_scale_inv, EMULATE_CAST)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_cache_target(
    k_cache: Tensor | None,
    v_cache: Tensor | None,
    slot_mapping: Tensor | None,
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Raise ValueError unless the caches and slots can take `num_tokens` rows of K and V (the layout
    `store_kvcache` writes; the fused q/k-norm + rope kernel writes it too)."""
    if k_cache is None or v_cache is None or slot_mapping is None:
        raise ValueError("give k_cache, v_cache and slot_mapping together")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] of one "
            f"dtype, got {k_cache.dtype} {tuple(k_cache.shape)} and {v_cache.dtype} {tuple(v_cache.shape)}"
        )
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"cache heads/head_dim {tuple(k_cache.shape[2:])} do not match key {(num_kv_heads, head_dim)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int32/int64 of shape ({num_tokens},), got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )


def store_kvcache(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `key`/`value` rows into the paged caches at the slots given by `slot_mapping`.

    key/value: [num_tokens, num_kv_heads, head_dim]; they may be non-contiguous views as long as the
    last dimension is contiguous (stride(-1) == 1), e.g. slices of a fused qkv output.
    k_cache/v_cache: contiguous [num_blocks, block_size, num_kv_heads, head_dim].
    slot_mapping: int32 or int64 [num_tokens]; slot = block_id * block_size + offset, -1 skips the token.
    Writes in place; never reads `slot_mapping` on the host (safe inside a CUDA graph).
    A float8_e4m3fn cache stores key / k_scale and value / v_scale (saturated at +-448).
    """
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key and value must both be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    check_cache_target(k_cache, v_cache, slot_mapping, num_tokens, num_kv_heads, head_dim)
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()  # [num_tokens, num_kv_heads, head_dim]
    if value.stride(-1) != 1:
        value = value.contiguous()  # [num_tokens, num_kv_heads, head_dim]
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        FP8=k_cache.dtype == FP8_CACHE_DTYPE,
        EMULATE_CAST=emulate_cast(),
        num_warps=STORE_NUM_WARPS,
    )
