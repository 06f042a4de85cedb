"""Triton W4A16 GEMM: y = x W^T with W in 4 bits (the internal layout of `quantization/int4_utils.py`),
x in fp16/bf16 (fp32 too, for tests), accumulation in fp32.

The weights are dequantized in registers, tile by tile: each [BLOCK_K, BLOCK_N] tile of q is read from
the int32 words of `qweight` [in / 8, out] (row k reads word k // 8 and shifts by 4 * (k % 8); the eight
rows of a word hit the same cache line). Two ways to apply the scales and zeros:

- group-aligned tiles (every tile lies inside one group; the usual case): the dot runs over the raw
  integers, which 16-bit floats hold exactly, and the tile's result is corrected per column:
  sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k). Per weight this leaves one shift,
  one mask and one conversion.
- per-row groups (GPTQ act-order `g_idx` whose groups are not contiguous, or groups smaller than the
  tile): each row's scale and zero are gathered and the tile dequantized before the dot.

Decode batches are bandwidth-bound (4 bits a weight): few rows, so the K dimension is split over
several programs (split-K) until the grid covers the SMs, each writes fp32 partials, and a second small
kernel adds them (and the bias) in a fixed order. Prefill uses large tiles and no split. The launch
configuration depends on tensor shapes only and nothing is read back to the host, so decode can be
captured in a CUDA graph.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Tunables: first guesses for an H200 (to be tuned with benchmarks/bench_w4a16.py --sweep).
# ---------------------------------------------------------------------------------------------------------
# Rows of x up to which a launch is a decode launch (split-K, small BLOCK_M).
DECODE_MAX_M = 64
# Decode tile: output columns and input rows per loop iteration (BLOCK_M is the next power of two >= M,
# at least 16, the smallest tensor-core tile).
DECODE_BLOCK_N = 64
DECODE_BLOCK_K = 128
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 4
# Split-K: aim for this many programs per SM ...
DECODE_PROGRAMS_PER_SM = 4
# ... without splitting K below this many rows per program ...
DECODE_MIN_K_PER_SPLIT = 256
# ... and use this many splits where the device has no SM count (CPU / Triton interpreter).
DECODE_DEFAULT_SPLITS_CPU = 2
# Prefill tiles (no split).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_M_LARGE = 128  # from this many rows on
PREFILL_BLOCK_N = 128
PREFILL_BLOCK_K = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_WARPS_LARGE = 8
PREFILL_NUM_STAGES = 3
# fp32 activations (tests): smaller tiles keep shared memory in bounds.
FP32_BLOCK_N = 64
FP32_BLOCK_K = 32
# The split-K reduction kernel: output columns per program.
REDUCE_BLOCK_N = 256

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch configuration (`block_k` is lowered to the group size when groups are smaller)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> W4A16Config:
    """The launch configuration for x [m, k] times a 4-bit [k, n] weight (shapes only)."""
    if dtype == torch.float32:
        block_n, block_k = FP32_BLOCK_N, FP32_BLOCK_K
    elif m <= DECODE_MAX_M:
        block_n, block_k = DECODE_BLOCK_N, DECODE_BLOCK_K
    else:
        block_n, block_k = PREFILL_BLOCK_N, PREFILL_BLOCK_K
    if m > DECODE_MAX_M:
        large = m >= 4 * PREFILL_BLOCK_M_LARGE
        return W4A16Config(
            block_m=PREFILL_BLOCK_M_LARGE if large else PREFILL_BLOCK_M,
            block_n=block_n,
            block_k=block_k,
            split_k=1,
            num_warps=PREFILL_NUM_WARPS_LARGE if large else PREFILL_NUM_WARPS,
            num_stages=PREFILL_NUM_STAGES,
        )
    block_m = max(16, _next_pow2(m))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if device.type == "cuda":
        wanted = max(1, DECODE_PROGRAMS_PER_SM * _sm_count(device.index or 0) // tiles)
    else:
        wanted = DECODE_DEFAULT_SPLITS_CPU
    split = max(1, min(wanted, k // max(DECODE_MIN_K_PER_SPLIT, block_k)))
    return W4A16Config(block_m, block_n, block_k, split, DECODE_NUM_WARPS, DECODE_NUM_STAGES)


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K], rows stride_xm apart
    qw_ptr,  # int32 [K / 8, N]
    qz_ptr,  # int32 [G, N / 8]
    s_ptr,  # [G, N]
    gidx_ptr,  # int32 [K] (read only with HAS_G_IDX)
    bias_ptr,  # [N] (read only with HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype, or fp32 partials [splits, M, N] with WRITE_PARTIALS
    M,
    N,
    K,
    group_size,
    k_per_split,
    stride_xm,
    ZERO_OFFSET: tl.constexpr,
    PER_ROW_GROUPS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % 8) * 4  # [BLOCK_N]: nibble of each column's zero in its qzeros word
    packed_n = N // 8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask_kn, other=0)
        q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF  # [BLOCK_K, BLOCK_N] int32
        if PER_ROW_GROUPS:
            if HAS_G_IDX:
                g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // group_size
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g[:, None] * packed_n + (offs_n // 8)[None, :], mask=mask_kn, other=0)
            z = ((zw >> zero_shift[None, :]) & 0xF) + ZERO_OFFSET
            w = ((q - z).to(tl.float32) * s).to(x.dtype)  # [BLOCK_K, BLOCK_N]
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        else:
            g = k0 // group_size  # the whole tile lies in this group
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * packed_n + offs_n // 8, mask=mask_n, other=0)
            z = (((zw >> zero_shift) & 0xF) + ZERO_OFFSET).to(tl.float32)  # [BLOCK_N]
            part = tl.dot(x, q.to(x.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            x_sum = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
            acc += (part - x_sum[:, None] * z[None, :]) * s[None, :]

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if not WRITE_PARTIALS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
    else:
        out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=mask_mn)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,  # fp32 [splits, M, N]
    bias_ptr,  # [N]
    out_ptr,  # [M, N]
    M,
    N,
    splits,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(splits):  # a fixed order: the same sums whatever the schedule
        acc += tl.load(part_ptr + split * M * N + row * N + offs_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def w4a16_matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    group_size: int,
    zero_offset: int,
    g_idx: Tensor | None = None,
    bias: Tensor | None = None,
    config: W4A16Config | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] W^T (+ bias) in x's dtype, W given in the internal 4-bit layout.

    `group_size`: input rows per group (-1: one group); `zero_offset`: added to every stored zero;
    `g_idx`: int32 [K] group of each input row (act-order), else row k is in group k // group_size.
    `config` overrides the launch configuration (tests, tuning)."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"w4a16_matmul: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"w4a16_matmul: x must be a 2-D tensor with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    groups = scales.shape[0]
    group = k if group_size == -1 else group_size
    if qweight.shape != (k // 8, n) or k % 8 or n % 8:
        raise ValueError(f"w4a16_matmul: qweight {tuple(qweight.shape)} does not fit x {tuple(x.shape)}")
    if qzeros.shape != (groups, n // 8) or scales.shape != (groups, n):
        raise ValueError(
            f"w4a16_matmul: qzeros {tuple(qzeros.shape)} / scales {tuple(scales.shape)} do not fit N={n}"
        )
    if g_idx is None and groups != triton.cdiv(k, group):
        raise ValueError(f"w4a16_matmul: {groups} scale groups for K={k} with group size {group_size}")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("w4a16_matmul: qweight, qzeros and scales must be contiguous")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    cfg = config or default_config(m, n, k, x.dtype, x.device)
    block_k = cfg.block_k
    if g_idx is None and group_size != -1 and group < block_k and group >= 16 and group == _next_pow2(group):
        block_k = group  # groups of 32 or 64: tiles of one group each
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    # Tiles never straddle a group when the group size is a multiple of the tile (or there is one group).
    per_row = g_idx is not None or (group_size != -1 and group % block_k != 0)
    dummy = qweight  # never read: a valid pointer for the unused optional arguments
    target = out if split_k == 1 else torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    _w4a16_kernel[grid](
        x,
        qweight,
        qzeros,
        scales,
        g_idx if g_idx is not None else dummy,
        bias if bias is not None else dummy,
        target,
        m,
        n,
        k,
        group,
        k_per_split,
        x.stride(0),
        ZERO_OFFSET=zero_offset,
        PER_ROW_GROUPS=per_row,
        HAS_G_IDX=g_idx is not None,
        HAS_BIAS=bias is not None and split_k == 1,
        WRITE_PARTIALS=split_k > 1,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split_k > 1:
        _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK_N))](
            target,
            bias if bias is not None else dummy,
            out,
            m,
            n,
            split_k,
            HAS_BIAS=bias is not None,
            BLOCK_N=REDUCE_BLOCK_N,
        )
    return out
