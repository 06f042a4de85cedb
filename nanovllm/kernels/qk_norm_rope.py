"""Triton kernel: per-head RMSNorm of q and k (Qwen3) and the rotary embedding, in place, in one launch,
optionally writing the step's K and V into the paged KV cache as well.

Unfused, a decode layer spends five small launches here (q-norm, k-norm, rope on q, rope on k, the KV
store), each a few microseconds of mostly fixed cost at small batches. This kernel does all of it in one
pass over the q and k columns of the fused qkv projection's output, writing the results back into that
buffer, so q and k become strided views of it (V is untouched), and, given a cache, storing the rotated
K and the V rows at each token's slot exactly as `kv_store.store_kvcache` would (FP8 caches included).

Rounding follows the unfused PyTorch ops exactly, so the two paths differ only by the order of the
sum of squares: the norm is computed in float32 and rounded to the input dtype, multiplied by the weight
and rounded again (RMSNorm's `weight * x.to(dtype)`), then rotated in float32 and rounded once more.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.fp8_cast import emulate_cast, to_fp8
from nanovllm.kernels.kv_store import FP8_CACHE_DTYPE, check_cache_target

# One program handles one token: all of its q and k heads as one [HEADS_PAD, HEAD_DIM / 2] tile per half,
# with up to NUM_WARPS warps, fewer where the tile has under one element per thread. (With 4 warps over
# the 64 elements of a tiny model's tile, 8 heads of 16, the H200 wrote some tokens' K heads to the cache
# wrongly, a few runs in ten; the interpreter and tiles of 128 or more elements never did.)
NUM_WARPS = 4
THREADS_PER_WARP = 32


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_token,
    eps,
    k_scale_inv,
    v_scale_inv,
    NUM_Q_HEADS: tl.constexpr,
    NUM_HEADS: tl.constexpr,  # q heads + k heads
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,
    FP8: tl.constexpr,
    EMULATE_CAST: tl.constexpr,
):
    token = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, half)
    head_mask = (heads < NUM_HEADS)[:, None]
    row = qkv_ptr + token.to(tl.int64) * stride_token
    lo_offsets = heads[:, None] * HEAD_DIM + dims[None, :]  # q heads then k heads are contiguous columns
    x1 = tl.load(row + lo_offsets, mask=head_mask, other=0.0)
    x2 = tl.load(row + lo_offsets + half, mask=head_mask, other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / HEAD_DIM + eps)[:, None]
        is_q = (heads < NUM_Q_HEADS)[:, None]
        w1 = tl.where(is_q, tl.load(q_weight_ptr + dims)[None, :], tl.load(k_weight_ptr + dims)[None, :])
        w2 = tl.where(
            is_q, tl.load(q_weight_ptr + half + dims)[None, :], tl.load(k_weight_ptr + half + dims)[None, :]
        )
        x1 = ((f1 * inv_rms).to(dtype).to(tl.float32) * w1.to(tl.float32)).to(dtype)
        x2 = ((f2 * inv_rms).to(dtype).to(tl.float32) * w2.to(tl.float32)).to(dtype)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + dims)[None, :]  # the table is [max_position, 2, half]
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + half + dims)[None, :]
    r1 = x1.to(tl.float32)
    r2 = x2.to(tl.float32)
    y1 = (r1 * cos - r2 * sin).to(dtype)
    y2 = (r2 * cos + r1 * sin).to(dtype)
    tl.store(row + lo_offsets, y1, mask=head_mask)
    tl.store(row + lo_offsets + half, y2, mask=head_mask)
    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # -1: a padded token, nothing to store
            num_kv_heads: tl.constexpr = NUM_HEADS - NUM_Q_HEADS
            slot_base = slot * (num_kv_heads * HEAD_DIM)
            # The k heads are rows NUM_Q_HEADS.. of the tile; a slot holds them as consecutive heads.
            is_k = (heads >= NUM_Q_HEADS)[:, None] & head_mask
            k_offsets = slot_base + (heads[:, None] - NUM_Q_HEADS) * HEAD_DIM + dims[None, :]
            k_offsets = tl.where(is_k, k_offsets, 0)
            k1, k2 = y1, y2
            if FP8:  # the same rounding as store_kvcache: the dtype value / scale, saturated
                k1 = to_fp8(y1.to(tl.float32) * k_scale_inv, EMULATE_CAST)
                k2 = to_fp8(y2.to(tl.float32) * k_scale_inv, EMULATE_CAST)
            cache_dtype = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + k_offsets, k1.to(cache_dtype), mask=is_k)
            tl.store(k_cache_ptr + k_offsets + half, k2.to(cache_dtype), mask=is_k)
            kv_heads = tl.arange(0, KV_HEADS_PAD)
            full_dims = tl.arange(0, HEAD_DIM)
            v_mask = (kv_heads < num_kv_heads)[:, None]
            v_offsets = kv_heads[:, None] * HEAD_DIM + full_dims[None, :]
            v = tl.load(row + NUM_HEADS * HEAD_DIM + v_offsets, mask=v_mask)
            if FP8:
                v = to_fp8(v.to(tl.float32) * v_scale_inv, EMULATE_CAST)
            tl.store(v_cache_ptr + slot_base + v_offsets, v.to(cache_dtype), mask=v_mask)


def qk_norm_rope(
    qkv: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: Tensor | None = None,
    k_weight: Tensor | None = None,
    eps: float = 1e-6,
    k_cache: Tensor | None = None,
    v_cache: Tensor | None = None,
    slot_mapping: Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Normalise (when weights are given) and rotate the q and k heads of `qkv` in place.

    qkv: [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim] with a contiguous last dimension, q
    columns first, then k, then v; positions: [num_tokens] int; cos_sin_cache: float32
    [max_position, 2, head_dim // 2] (cos then sin). No host synchronisation (CUDA-graph safe).
    With `k_cache`, `v_cache` and `slot_mapping` (as `store_kvcache` takes them) the rotated K and the V
    rows are also written into the paged cache, quantized on store for a float8_e4m3fn cache.
    """
    if qkv.dim() != 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be 2-D with a contiguous last dimension, got {tuple(qkv.shape)}")
    if qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"qkv has {qkv.shape[1]} columns, expected ({num_q_heads} + 2 x {num_kv_heads}) x {head_dim}"
        )
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if cos_sin_cache.dtype != torch.float32 or tuple(cos_sin_cache.shape[1:]) != (2, head_dim // 2):
        raise ValueError(
            f"cos_sin_cache must be float32 [max_position, 2, {head_dim // 2}], got "
            f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight, or neither")
    if positions.numel() != qkv.shape[0]:
        raise ValueError(f"{positions.numel()} positions for {qkv.shape[0]} tokens")
    store_kv = k_cache is not None or v_cache is not None or slot_mapping is not None
    if store_kv:
        check_cache_target(k_cache, v_cache, slot_mapping, qkv.shape[0], num_kv_heads, head_dim)
    num_tokens = qkv.shape[0]
    if num_tokens == 0:
        return
    has_norm = q_weight is not None
    num_heads = num_q_heads + num_kv_heads
    heads_pad = triton.next_power_of_2(num_heads)
    num_warps = max(1, min(NUM_WARPS, heads_pad * (head_dim // 2) // THREADS_PER_WARP))
    _qk_norm_rope_kernel[(num_tokens,)](
        qkv,
        positions,
        cos_sin_cache.contiguous(),
        q_weight if has_norm else qkv,
        k_weight if has_norm else qkv,
        k_cache if store_kv else qkv,
        v_cache if store_kv else qkv,
        slot_mapping if store_kv else positions,
        qkv.stride(0),
        eps,
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_Q_HEADS=num_q_heads,
        NUM_HEADS=num_heads,
        HEADS_PAD=heads_pad,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HAS_NORM=has_norm,
        STORE_KV=store_kv,
        FP8=store_kv and k_cache.dtype == FP8_CACHE_DTYPE,
        EMULATE_CAST=emulate_cast(),
        num_warps=num_warps,
    )
