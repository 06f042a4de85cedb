"""Triton attention kernels over the paged KV cache: causal varlen prefill and split-K decode.

Cache layout (flash-attn paged layout): k_cache/v_cache are [num_blocks, block_size, num_kv_heads, head_dim],
so inside one block a token's head slice is `head_dim` contiguous elements and consecutive tokens are
`num_kv_heads * head_dim` elements apart. Key position p of sequence i lives in slot
`block_tables[i, p // block_size] * block_size + p % block_size`.

Grouped-query attention is handled by packing: the query heads that share one KV head are rows of one
tile, so each K/V tile is read once per KV head. Softmax runs in fp32 with exp2 and the scale folded into
`scale * log2(e)`. No function here reads device data on the host, and decode launch grids depend on
tensor shapes only, so decode can be captured in a CUDA graph.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.device import compute_capability, interpreting, sm_count
from nanovllm.kernels.tuning import decode_config, prefill_config

LOG2E = 1.4426950408889634
# The window argument meaning "no sliding window": more positions than any context (int32-safe).
NO_WINDOW = 1 << 30

# ---------------------------------------------------------------------------------------------------------
# Tunables. The values are first guesses for an H100 (bf16, head_dim 128); to be tuned with
# benchmarks/bench_attention.py.
# ---------------------------------------------------------------------------------------------------------
# Decode: KV tokens per loop iteration. The tile must not straddle a cache block, so the kernel uses the
# largest power of two <= this value that divides block_size (block_size is a multiple of 16).
DECODE_TILE_N = 64
# fp32 tiles are twice as large; keep shared memory for the pipelined K/V copies within the H100's 228 KiB.
DECODE_TILE_N_FP32 = 32
# Warps per decode program (one program = one sequence x one KV head x one split).
DECODE_NUM_WARPS = 4
# K/V tiles in flight per decode program (software pipelining depth): the main lever for bandwidth.
DECODE_NUM_STAGES = 3
DECODE_NUM_STAGES_FP32 = 2
# Launch order of the decode programs. False: the grid's first axis is the sequence, so programs that
# run at the same time read one KV head of neighbouring sequences, a head_dim-wide row (128 bytes with
# an FP8 cache, 256 in bf16) out of every token's num_kv_heads rows. True: the first axis is the KV
# head, so they read neighbouring heads of the same tokens, whose rows are adjacent in the cache.
# Measured on the H200 (2026-12-03, benchmarks/RESULTS.md tenth session): with an FP8 cache
# tune_attention.py has heads first faster at every shape with the same tiles (batch 256 148.6 -> 143.1
# us, 128 103.1 -> 97.5, 64 66.2 -> 64.3, 1-32 within 2%); bench.py in bf16 made 25,547 tok/s against
# 25,267 sequence-first (means of three runs each, alternating, one call).
DECODE_HEADS_FIRST = True
# Automatic split count: aim for this many decode programs per SM ...
DECODE_PROGRAMS_PER_SM = 4
# ... but give every split at least this many cached tokens of the block-table capacity ...
DECODE_MIN_TOKENS_PER_SPLIT = 128
# ... and never more splits than this (the merge kernel reads all partials of one head in one tile).
DECODE_MAX_SPLITS = 64
# Split count used when the device has no SM count (CPU / Triton interpreter).
DECODE_DEFAULT_SPLITS_CPU = 1
# Warps of the kernel that merges split-K partials.
MERGE_NUM_WARPS = 4

# Prefill: query rows per program (rows = query tokens x query heads of one KV head group).
PREFILL_BLOCK_M = 128
# Prefill: keys per loop iteration.
PREFILL_BLOCK_N = 64
# Warps per prefill program: head_dim 128 wants 8 warps for the 128-row tiles, head_dim 64 is fine with 4.
PREFILL_NUM_WARPS = {64: 4, 128: 8}
PREFILL_NUM_WARPS_DEFAULT = 4
# K/V tiles in flight per prefill program.
PREFILL_NUM_STAGES = 3
# fp32 (ieee dot, twice the bytes per element): smaller tiles and fewer stages to fit in shared memory.
PREFILL_BLOCK_M_FP32 = 64
PREFILL_BLOCK_N_FP32 = 32
PREFILL_NUM_STAGES_FP32 = 2


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# An FP8 cache holds K / k_scale and V / v_scale (kv_store.py). The kernels convert its values to fp16
# (exact: e4m3 fits) for 16-bit queries, whose dots then run in fp16 (bf16 queries are converted, in
# decode and prefill alike), or to fp32 for fp32 queries, fold k_scale into the softmax scale and
# multiply the output by v_scale.
KV_FP8_DTYPE = torch.float8_e4m3fn


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must be exact (the engine compares fp32 runs token for token); 16-bit inputs use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")


def _check_dtypes(*tensors: Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {_SUPPORTED_DTYPES}")
    for t in tensors[1:]:
        if t.dtype != dtype:
            raise ValueError(f"dtype mismatch: {t.dtype} != {dtype}")


def _check_kv_dtypes(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Check q/k/v dtypes; True when k and v are an FP8 (e4m3) cache read with scales."""
    if k.dtype == KV_FP8_DTYPE and v.dtype == KV_FP8_DTYPE:
        _check_dtypes(q)
        return True
    _check_dtypes(q, k, v)
    return False


def _check_cache(k_cache: Tensor, v_cache: Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides with a contiguous last dimension")
    block_size = k_cache.shape[1]
    if block_size % 16:
        raise ValueError(f"block_size must be a multiple of 16, got {block_size}")


def _window_arg(sliding_window: int | None) -> int:
    """The kernels' window argument: W, or a count larger than any context for no window."""
    if sliding_window is None:
        return NO_WINDOW
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 (or None), got {sliding_window}")
    return min(int(sliding_window), NO_WINDOW)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _decode_tile(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    tile = DECODE_TILE_N_FP32 if dtype == torch.float32 else DECODE_TILE_N
    # Head dims above 128 shrink the tile so the pipelined K/V copies keep the same shared-memory size.
    tile = max(16, tile * 128 // max(head_dim, 128))
    while block_size % tile:
        tile //= 2
    return tile


def _decode_launch(
    device: torch.device, dtype: torch.dtype, batch: int, block_size: int, head_dim: int
) -> tuple[int, int, int]:
    """(TILE_N, num_warps, num_stages) of a decode launch: the table measured for this GPU model
    (nanovllm/kernels/tuning.py, 16-bit queries at head_dim 128, where it was measured), else the
    defaults above. `batch` is the launch's (in a CUDA graph, its bucket's) batch size."""
    fp32 = dtype == torch.float32
    tile = _decode_tile(block_size, head_dim, dtype)
    warps, stages = DECODE_NUM_WARPS, DECODE_NUM_STAGES_FP32 if fp32 else DECODE_NUM_STAGES
    if not fp32 and head_dim == 128:
        tuned = decode_config(device, batch)
        if tuned is not None and block_size % tuned.tile_n == 0:
            tile, warps, stages = tuned
    return tile, warps, stages


def _prefill_config(
    head_dim: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a prefill launch: the table measured for this GPU
    model (nanovllm/kernels/tuning.py; 16-bit queries at head_dim 128, where it was measured), else the
    defaults above."""
    if device is not None and dtype != torch.float32 and head_dim == 128:
        tuned = prefill_config(device)
        if tuned is not None:
            return tuple(tuned)
    if dtype == torch.float32:
        block_m, block_n, stages = PREFILL_BLOCK_M_FP32, PREFILL_BLOCK_N_FP32, PREFILL_NUM_STAGES_FP32
    else:
        block_m, block_n, stages = PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_NUM_STAGES
    if head_dim > 128:  # keep the Q tile and the K/V stages within shared memory
        block_m, block_n, stages = max(16, block_m // 2), max(16, block_n // 2), min(stages, 2)
    return block_m, block_n, PREFILL_NUM_WARPS.get(head_dim, PREFILL_NUM_WARPS_DEFAULT), stages


def default_num_splits(
    device: torch.device, batch: int, num_kv_heads: int, max_num_blocks: int, block_size: int
) -> int:
    """Split-K factor for decode, from shapes only (no host synchronisation, CUDA-graph safe)."""
    if device.type != "cuda":
        return DECODE_DEFAULT_SPLITS_CPU
    programs = max(1, batch * num_kv_heads)
    wanted = math.ceil(DECODE_PROGRAMS_PER_SM * sm_count(device, cpu_default=1) / programs)
    by_capacity = max(1, max_num_blocks * block_size // DECODE_MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_capacity, DECODE_MAX_SPLITS))


@triton.jit
def _to_fp16_saturated(x):
    """x as fp16 for a dot with an FP8 cache: values beyond fp16's range saturate instead of becoming
    inf; NaN stays NaN."""
    return tl.clamp(x.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)


@triton.jit
def _widen_fp8_words(words, DOT: tl.constexpr, ASM: tl.constexpr):
    """uint16 words, each two e4m3 values (low byte first), as two tensors of DOT values (exact): the
    low bytes' and the high bytes'. ASM: one `cvt.rn.f16x2.e4m3x2` per word (sm_89+), whose halves are
    the two fp16 values; otherwise the bytes are split and converted one by one."""
    if ASM:
        both = tl.inline_asm_elementwise(
            "cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h", [words], dtype=tl.uint32, is_pure=True, pack=1
        )
        low = (both & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        high = (both >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        low = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        high = (words >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return low.to(DOT), high.to(DOT)


# ---------------------------------------------------------------------------------------------------------
# Decode: split-K over the cached context, one program per (sequence, KV head, split)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    qk_scale,
    num_splits,
    window,
    v_scale,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_bt_seq,
    stride_out_seq,
    stride_out_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    WIDEN_ASM: tl.constexpr,  # widen FP8 V words with one PTX cvt (False under the interpreter: no asm)
    HEADS_FIRST: tl.constexpr,  # the grid is (KV heads, sequences, splits), else (sequences, KV heads, ...)
):
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        num_heads = tl.num_programs(0) * GROUP
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_heads = tl.num_programs(1) * GROUP
    split = tl.program_id(2)
    # An FP8 cache is read into fp16 for both dots when the queries are 16-bit (e4m3 values are exact in
    # fp16 and softmax probabilities closer than in bf16, and fp16 needs no second conversion), into fp32
    # for fp32 queries. V is read as 16-bit words, each the two e4m3 values of head dims 2j and 2j+1:
    # read as bytes, Triton stages the V tile in shared memory as bytes and gathers it one byte at a time
    # for the second dot (which runs across tokens). The words' two halves become two dots of
    # HEAD_DIM / 2 columns. Below HEAD_DIM 32 a half is narrower than a dot allows, and V is read whole.
    # (Compiled for sm_90 at head dim 128, 128-token tiles: 2,303 PTX instructions before, 1,333 now,
    # bf16 1,234. On the H200 the reference workload with an FP8 cache went from 18,315 tok/s, below
    # bf16's 24,979, to 32,956 beside bf16's 25,282: benchmarks/RESULTS.md.)
    FP8: tl.constexpr = k_cache_ptr.dtype.element_ty == tl.float8e4nv
    V_WORDS: tl.constexpr = FP8 and HEAD_DIM >= 32
    FP8_DOT: tl.constexpr = tl.float32 if q_ptr.dtype.element_ty == tl.float32 else tl.float16

    # Each sequence's own context (with a sliding window: its last `window` tokens) is divided evenly
    # among the splits (in whole tiles); a split that starts past the context runs zero iterations and
    # writes the neutral partial (max=-inf, sum=0, acc=0).
    context_len = tl.load(context_lens_ptr + seq)
    kv_start = tl.maximum(context_len - window, 0)  # first visible key (window >= context: 0)
    first_tile = kv_start // TILE_N
    num_tiles = tl.cdiv(context_len, TILE_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, first_tile + num_tiles)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded to >= 16 rows for tl.dot
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)

    q_offsets = seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
    if FP8 and q_ptr.dtype.element_ty == tl.bfloat16:
        q = _to_fp16_saturated(q)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    pairs = tl.arange(0, HEAD_DIM // 2)
    acc_even = tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32)  # V_WORDS: head dims 0, 2, 4, ...
    acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32)  # and 1, 3, 5, ...
    v_words_ptr = v_cache_ptr.to(tl.pointer_type(tl.uint16))

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    for tile in range(tile_start, tile_end):
        pos0 = tile * TILE_N
        # TILE_N divides BLOCK_SIZE, so the whole tile lies in one block, and that block holds a visible
        # position (in [kv_start, context_len)), so its block-table entry is valid.
        block = tl.load(block_table_row + pos0 // BLOCK_SIZE).to(tl.int64)
        token_in_block = pos0 % BLOCK_SIZE + offs_n
        kv_offsets = (
            block * stride_cache_block
            + head_offset
            + token_in_block[:, None] * stride_cache_token
            + dims[None, :]
        )  # [TILE_N, HEAD_DIM]: rows of HEAD_DIM contiguous elements
        valid = ((pos0 + offs_n) < context_len) & ((pos0 + offs_n) >= kv_start)
        k = tl.load(k_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)  # [TILE_N, HEAD_DIM]
        if V_WORDS:
            # (decode_attention checks that the strides are even: the byte offsets halve exactly)
            word_offsets = (
                (block * stride_cache_block + head_offset) // 2
                + token_in_block[:, None] * (stride_cache_token // 2)
                + pairs[None, :]
            )  # [TILE_N, HEAD_DIM / 2]
            words = tl.load(v_words_ptr + word_offsets, mask=valid[:, None], other=0)
            v_even, v_odd = _widen_fp8_words(words, FP8_DOT, WIDEN_ASM)
        else:
            v = tl.load(v_cache_ptr + kv_offsets, mask=valid[:, None], other=0.0)  # [TILE_N, HEAD_DIM]
        if FP8:  # scales applied outside the loop
            k = k.to(FP8_DOT)
            if not V_WORDS:
                v = v.to(FP8_DOT)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_WORDS:
            p_dot = p.to(FP8_DOT)
            acc_even = acc_even * alpha[:, None] + tl.dot(p_dot, v_even, input_precision=DOT_PRECISION)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p_dot, v_odd, input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if V_WORDS:  # interleave the halves back: [GROUP_PAD, HEAD_DIM / 2, 2] -> dims 2j, 2j + 1
        acc = tl.reshape(tl.join(acc_even, acc_odd), [GROUP_PAD, HEAD_DIM])
    if FP8:
        acc = acc * v_scale
    if SINGLE_SPLIT:
        # A context_len of 0 (e.g. padding rows of a CUDA graph batch) leaves l_i = 0: write zeros, not NaN.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        out_offsets = seq.to(tl.int64) * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        # Partials are contiguous [batch, num_heads, num_splits(, HEAD_DIM)] in fp32.
        part_index = (seq.to(tl.int64) * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_max_ptr + part_index, m_i, mask=row_mask)
        tl.store(part_sum_ptr + part_index, l_i, mask=row_mask)
        acc_offsets = part_index[:, None] * HEAD_DIM + dims[None, :]
        tl.store(part_acc_ptr + acc_offsets, acc, mask=row_mask[:, None])


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    num_splits,
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)

    part_index = (seq.to(tl.int64) * num_heads + head) * num_splits + splits  # [SPLITS_PAD]
    m = tl.load(part_max_ptr + part_index, mask=split_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + part_index, mask=split_mask, other=0.0)
    acc = tl.load(
        part_acc_ptr + part_index[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None], other=0.0
    )  # [SPLITS_PAD, HEAD_DIM]
    # With context_len >= 1 split 0 holds a token, so the global max is finite and empty splits
    # (max=-inf) get weight exp2(-inf) = 0. A context_len of 0 (CUDA-graph padding) gives zeros.
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)
    numerator = tl.sum(acc * weight[:, None], 0)  # [HEAD_DIM]
    denominator = tl.sum(l * weight, 0)
    out = numerator / tl.where(denominator > 0.0, denominator, 1.0)
    out_offsets = seq.to(tl.int64) * stride_out_seq + head * stride_out_head + dims
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Attention of one new query per sequence over its paged KV cache (split-K "flash decoding").

    q: [batch, num_heads, head_dim]. k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    block_tables: int32 [batch, max_num_blocks], padded with -1 (never dereferenced past the context).
    context_lens: int32 [batch], >= 1, including the current token whose K/V is already in the cache
    (a 0 entry, e.g. a padding row of a CUDA-graph batch, reads nothing and yields zeros).
    num_splits: programs per (sequence, KV head) along the context; None picks it from the SM count,
    the batch size and the block-table capacity (shapes only, so no host synchronisation).
    sliding_window: W attends only the last W cached tokens (positions context_len - W .. context_len - 1,
    transformers' count); the splits divide that range, and table entries of blocks wholly before it
    are never read (may be -1).
    k_scale/v_scale: the per-tensor scales of an FP8 (float8_e4m3fn) cache (its values are K / k_scale).
    Returns [batch, num_heads, head_dim] in q's dtype (written into `out` if given).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got {tuple(q.shape)}")
    _check_cache(k_cache, v_cache)
    kv_fp8 = _check_kv_dtypes(q, k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, cache has {cache_head_dim}")
    _check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_num_blocks], got {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [{batch}], got {tuple(context_lens.shape)}")
    if out is None:
        out = torch.empty_like(q)  # [batch, num_heads, head_dim]
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(q.device, batch, num_kv_heads, block_tables.shape[1], block_size)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    window = _window_arg(sliding_window)
    q = _last_dim_contiguous(q)  # [batch, num_heads, head_dim]
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    if kv_fp8 and (any(stride % 2 for stride in v_cache.stride()[:3]) or v_cache.data_ptr() % 2):
        # the kernel reads V two values at a time (see _decode_split_kernel)
        raise ValueError(f"an FP8 V cache needs even strides and address, got strides {v_cache.stride()}")

    group = num_heads // num_kv_heads
    tile_n, num_warps, num_stages = _decode_launch(q.device, q.dtype, batch, block_size, head_dim)
    single = num_splits == 1
    if single:
        part_acc = part_max = part_sum = out  # unused placeholders
    else:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)

    heads_first = DECODE_HEADS_FIRST
    grid = (num_kv_heads, batch, num_splits) if heads_first else (batch, num_kv_heads, num_splits)
    _decode_split_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_max,
        part_sum,
        scale * LOG2E * (k_scale if kv_fp8 else 1.0),
        num_splits,
        window,
        v_scale if kv_fp8 else 1.0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        SINGLE_SPLIT=single,
        WIDEN_ASM=kv_fp8
        and q.is_cuda
        and not interpreting()
        and compute_capability(q.device) >= (8, 9),  # the e4m3x2 cvt's first GPUs
        HEADS_FIRST=heads_first,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        _decode_merge_kernel[(batch, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=MERGE_NUM_WARPS,
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Prefill: causal varlen attention, optionally over a cached prefix read through the block table
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _prefill_attend(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_ptr,
    v_ptr,
    block_table_row,
    k_row_start,
    kv_head,
    start,
    end,
    lo,
    window,
    qk_scale,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys [start, end) of one sequence.

    Without CAUSAL_MASK every key in the range must be visible to every query row and lie below `end`
    (callers pass whole tiles); with it, keys above a row's position, at/after `end`, before `lo` (never
    read: their blocks may be freed) or outside a row's window (`window` keys up to its own) are masked.
    """
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k_head = kv_head.to(tl.int64) * stride_k_head
    v_head = kv_head.to(tl.int64) * stride_v_head
    if not PAGED:
        # Scalar tile pointers that advance a tile at a time, over loop-invariant int32 offsets within the
        # tile: no per-row int64 offsets to rebuild each iteration (the unmasked loop at the H200 launch
        # compiled to 648 PTX instructions, from 697, and 742 SASS instructions, from 828).
        k_tile = k_ptr + (k_row_start + start).to(tl.int64) * stride_k_token + k_head
        v_tile = v_ptr + (k_row_start + start).to(tl.int64) * stride_v_token + v_head
        k_in_tile = offs_n[:, None] * stride_k_token + dims[None, :]  # [BLOCK_N, HEAD_DIM]
        v_in_tile = offs_n[:, None] * stride_v_token + dims[None, :]  # [BLOCK_N, HEAD_DIM]
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] key positions in the sequence
        in_range = (pos < end) & (pos >= lo)
        if PAGED:
            # Per-token gather through the block table, so a tile may cross block boundaries. (One load of
            # the block id per tile, where a tile lies in one block, measured no faster on the H200 at the
            # tuned launch: 346 against 355 TFLOP/s over a 128K prompt's chunks, RESULTS.md.)
            if CAUSAL_MASK:
                block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
            else:
                block = tl.load(block_table_row + pos // BLOCK_SIZE).to(tl.int64)
            token_in_block = pos % BLOCK_SIZE
            # The head's offset goes on the scalar base, not on each row (742 PTX instructions, from 758).
            k_rows = block * stride_k_block + token_in_block * stride_k_token
            v_rows = block * stride_v_block + token_in_block * stride_v_token
            k_ptrs = (k_ptr + k_head) + (k_rows[:, None] + dims[None, :])  # [BLOCK_N, HEAD_DIM]
            v_ptrs = (v_ptr + v_head) + (v_rows[:, None] + dims[None, :])  # [BLOCK_N, HEAD_DIM]
        else:
            k_ptrs = k_tile + k_in_tile
            v_ptrs = v_tile + v_in_tile
            k_tile += BLOCK_N * stride_k_token.to(tl.int64)
            v_tile += BLOCK_N * stride_v_token.to(tl.int64)
        if CAUSAL_MASK:
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if k_ptr.dtype.element_ty == tl.float8e4nv:  # FP8 cache: scales applied by the caller
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] unscaled scores
        if CAUSAL_MASK:
            visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible & in_range[None, :], s, float("-inf"))
        # m_i is in the scaled (log2) domain. qk_scale > 0 (prefill_attention checks), so the max of the
        # scaled scores is the scaled max of the raw ones: one multiply per row instead of one per score,
        # and p's exponent stays one FMA. A masked score stays -inf scaled, so its p is 0.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if CAUSAL_MASK:  # a row may see no key of this tile yet (before its window): keep it at zero
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    block_tables_ptr,
    qk_scale,
    window,
    v_scale,
    stride_q_token,
    stride_q_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_out_token,
    stride_out_head,
    stride_bt_seq,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    # Query tiles run last-first: the tiles near the end of a sequence see the most keys, start them early.
    q_tile = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k_ptr + seq)
    k_len = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start
    q0 = q_tile * TOKENS_PER_TILE
    if q0 >= q_len:
        return
    prefix = k_len - q_len  # cached tokens before the first new query

    # Row r of the tile is query token q0 + r // GROUP, query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = (token < TOKENS_PER_TILE) & (q0 + token < q_len)
    q_pos = prefix + q0 + token  # [BLOCK_M] position of each row's query in the sequence
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + q0 + token).to(tl.int64)
    q_offsets = q_rows[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    # An FP8 cache with bf16 queries: both dots run in fp16 (the K/V tiles are converted to q's dtype in
    # _prefill_attend). e4m3 -> bf16 is two conversions per pair of values on sm_90 (cvt.rn.f16x2.e4m3x2,
    # then cvt.bf16.f16 for each half), e4m3 -> fp16 the first one only, and fp16 keeps the softmax
    # probabilities closer; a bf16 query beyond fp16's range saturates instead of becoming inf. Unlike
    # decode, V is read as bytes: prefill's wgmma dots take both operands from shared memory, and the
    # FP8 tiles are read from it in 16-byte vectors, converted and stored back as 16-bit values, with no
    # byte-by-byte gather to avoid (reading V as words, as decode does, compiled to more instructions).
    # (sm_90, head dim 128, BLOCK_M 128 x BLOCK_N 64: the unmasked loop 592 PTX instructions before, 473
    # now, bf16 cache 500.) fp16 and fp32 queries are unchanged.
    if k_ptr.dtype.element_ty == tl.float8e4nv and q_ptr.dtype.element_ty == tl.bfloat16:
        q = _to_fp16_saturated(q)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    # Rows see keys (q_pos - window, q_pos]. Keys [full_lo, prefix + q0] are visible to every row (the
    # last row's window starts at full_lo): whole tiles of them need no mask. Keys before them down to
    # the first row's window start `lo`, and keys after them up to the last row, are masked.
    first_q = prefix + q0
    lo = tl.maximum(first_q - window + 1, 0)
    full_lo = tl.cdiv(tl.maximum(first_q + TOKENS_PER_TILE - window, 0), BLOCK_N) * BLOCK_N
    full_end = ((first_q + 1) // BLOCK_N) * BLOCK_N
    masked_end = tl.minimum(full_lo, full_end)
    # The last row of the tile sees keys up to prefix + q0 + TOKENS_PER_TILE - 1.
    kv_end = tl.minimum(k_len, first_q + TOKENS_PER_TILE)
    # fmt: off
    acc, l_i, m_i = _prefill_attend(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, block_table_row, k_start, kv_head, (lo // BLOCK_N) * BLOCK_N,
        masked_end, lo, window, qk_scale,
        stride_k_block, stride_k_token, stride_k_head, stride_v_block, stride_v_token, stride_v_head,
        HEAD_DIM, BLOCK_N, BLOCK_SIZE, PAGED, True, DOT_PRECISION,
    )
    acc, l_i, m_i = _prefill_attend(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, block_table_row, k_start, kv_head, full_lo, full_end, lo,
        window, qk_scale,
        stride_k_block, stride_k_token, stride_k_head, stride_v_block, stride_v_token, stride_v_head,
        HEAD_DIM, BLOCK_N, BLOCK_SIZE, PAGED, False, DOT_PRECISION,
    )
    acc, l_i, m_i = _prefill_attend(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, block_table_row, k_start, kv_head, full_end, kv_end, lo,
        window, qk_scale,
        stride_k_block, stride_k_token, stride_k_head, stride_v_block, stride_v_token, stride_v_head,
        HEAD_DIM, BLOCK_N, BLOCK_SIZE, PAGED, True, DOT_PRECISION,
    )
    # fmt: on

    out = acc / l_i[:, None]
    if k_ptr.dtype.element_ty == tl.float8e4nv:
        out = out * v_scale
    out_offsets = q_rows[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    block_tables: Tensor | None = None,
    out: Tensor | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Causal varlen attention for a prefill batch.

    q: [total_q, num_heads, head_dim]. cu_seqlens_q/k: int32 [num_seqs + 1].
    Sequence i has q_len = cu_q[i+1] - cu_q[i] new queries and k_len = cu_k[i+1] - cu_k[i] >= q_len keys;
    query j of sequence i sits at position k_len - q_len + j and attends keys at positions 0..that position
    (causal with a cached prefix).
    If block_tables is None: k, v are [total_k, num_kv_heads, head_dim] (last dim contiguous) indexed by
    cu_seqlens_k (no prefix cache; then k_len == q_len).
    Else: k, v are the paged caches [num_blocks, block_size, num_kv_heads, head_dim] and key position p of
    sequence i lives at slot block_tables[i, p // block_size] * block_size + p % block_size.
    sliding_window: W limits each query at position i to keys i - W < j <= i (transformers' count); block
    table entries of blocks wholly before every query's window are never read (may be -1).
    k_scale/v_scale: the per-tensor scales of an FP8 (float8_e4m3fn) paged cache.
    num_heads must be a multiple of num_kv_heads (GQA). Returns [total_q, num_heads, head_dim] in q's dtype
    (written into `out` if given). The grid uses max_seqlen_q only; nothing is read back to the host.
    """
    del max_seqlen_k  # the key range of each tile is derived on the device from cu_seqlens_k
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, num_heads, head_dim], got {tuple(q.shape)}")
    kv_fp8 = _check_kv_dtypes(q, k, v)
    qk_scale = scale * LOG2E * (k_scale if kv_fp8 else 1.0)
    if not qk_scale > 0:  # _prefill_attend takes its row maxima before scaling
        raise ValueError(f"scale (times k_scale for an FP8 cache) must be positive, got {scale}, {k_scale}")
    total_q, num_heads, head_dim = q.shape
    _check_head_dim(head_dim)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k differ in shape: {tuple(cu_seqlens_q.shape)} vs "
            f"{tuple(cu_seqlens_k.shape)}"
        )
    if block_tables is None:
        if k.dim() != 3 or k.shape != v.shape:
            raise ValueError(
                f"without block_tables, k and v must be [total_k, num_kv_heads, head_dim], got "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        k = _last_dim_contiguous(k)  # [total_k, num_kv_heads, head_dim]
        v = _last_dim_contiguous(v)  # [total_k, num_kv_heads, head_dim]
        num_kv_heads = k.shape[1]
        block_size = 16  # unused by the contiguous path
        # Contiguous rows: (block, token, head) strides with a dummy block stride.
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
        block_tables_arg, stride_bt = cu_seqlens_k, 0  # unused placeholder
    else:
        _check_cache(k, v)
        num_kv_heads, block_size = k.shape[2], k.shape[1]
        if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
            raise ValueError(
                f"block_tables must be [{num_seqs}, max_num_blocks], got {tuple(block_tables.shape)}"
            )
        block_tables_arg = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
        stride_bt = block_tables_arg.stride(0)
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
    if k.shape[-1] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, k has {k.shape[-1]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if out is None:
        out = torch.empty_like(q)  # [total_q, num_heads, head_dim]
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    if total_q == 0 or num_seqs == 0 or max_seqlen_q <= 0:
        return out
    q = _last_dim_contiguous(q)  # [total_q, num_heads, head_dim]
    window = _window_arg(sliding_window)

    group = num_heads // num_kv_heads
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype, q.device)
    block_m = max(block_m, triton.next_power_of_2(group))  # at least one query token per tile
    tokens_per_tile = block_m // group
    grid = (num_kv_heads, num_seqs, triton.cdiv(max_seqlen_q, tokens_per_tile))
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        block_tables_arg,
        qk_scale,
        window,
        v_scale if kv_fp8 else 1.0,
        q.stride(0),
        q.stride(1),
        *k_strides,
        *v_strides,
        out.stride(0),
        out.stride(1),
        stride_bt,
        GROUP=group,
        BLOCK_M=block_m,
        TOKENS_PER_TILE=tokens_per_tile,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        PAGED=block_tables is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
