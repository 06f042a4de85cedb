"""Triton W4A16 GEMM: y = x W^T with W in 4 bits (the internal layout of `quantization/int4_utils.py`),
x in fp16/bf16 (fp32 too, for tests), accumulation in fp32.

The weights are dequantized in registers. A loop iteration loads BLOCK_K / 8 rows of int32 words of
`qweight` [in / 8, out] (each word once) and runs 8 dots: dot i takes nibble i of every word, i.e. input
rows 8r + i, against the matching (stride-8) columns of x. Scales and zeros are applied in one of three
ways (SCALE_MODE):

0. the tile lies inside one group (group size a multiple of BLOCK_K, or one group per channel): the dots
   run over the integers q_kn - z_n (-16..15, which 16-bit floats hold exactly) and the tile's sum is
   scaled per column after: sum_k x_k (q_kn - z_n) s_n = s_n sum_k x_k (q_kn - z_n). (An earlier form
   dotted the raw q and subtracted z_n sum_k x_k after, the row sums taken by tl.sum over the dot's x
   operand; on the H200 it failed test_explicit_configs' [16, 32]-tile case, which the interpreter passed);
1. groups smaller than the tile (32, 64): each word row has one group, so one [rows, BLOCK_N] block of
   scales and zeros serves all 8 dots, w = q s - z s;
2. GPTQ act-order rows whose groups are not contiguous: each input row's scale and zero gathered through
   `g_idx`.

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
PREFILL_BLOCK_K = 128
PREFILL_NUM_WARPS = 4
PREFILL_NUM_WARPS_LARGE = 8
PREFILL_NUM_STAGES = 3
# fp32 activations (tests): narrower tiles keep shared memory in bounds.
FP32_BLOCK_N = 64
FP32_BLOCK_K = 128
# Nibbles to floats by the 2**23 trick (see `_nibbles`) rather than a conversion instruction.
MAGIC_CONVERT = True
# A tile's 8 dots each take BLOCK_K / 8 rows: tl.dot needs 16, so BLOCK_K is a multiple of this.
MIN_BLOCK_K = 128
# The split-K reduction kernel: output columns per program.
REDUCE_BLOCK_N = 256

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch configuration. `block_k`: input rows per loop iteration, a multiple of 128;
    `magic`: the float conversion of `_nibbles`."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    magic: bool = MAGIC_CONVERT


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
def _nibbles(words, i: tl.constexpr, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """Nibble i of every int32 word as exact values 0..15 in `dtype`. MAGIC: or the nibble into the
    mantissa of 2**23 and subtract 2**23 in fp32 (integer and float adds; to a 16-bit dtype one packed
    conversion per two values), else one int-to-float conversion per value."""
    v = (words >> (4 * i)) & 0xF
    if MAGIC:
        return ((v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(dtype)
    return v.to(dtype)


@triton.jit
def _centered_nibbles(words, i: tl.constexpr, zeros, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """Nibble i of every int32 word [rows, BLOCK_N] minus its column's integer zero `zeros` [BLOCK_N]:
    exact values -16..15 in `dtype`. MAGIC: the zero folded into the subtracted 2**23 (exact in fp32)."""
    v = (words >> (4 * i)) & 0xF
    if MAGIC:
        bias = 8388608.0 + zeros.to(tl.float32)  # [BLOCK_N], exact
        return ((v | 0x4B000000).to(tl.float32, bitcast=True) - bias[None, :]).to(dtype)
    return (v - zeros[None, :]).to(dtype)


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K], rows stride_xm apart
    qw_ptr,  # int32 [K / 8, N]
    qz_ptr,  # int32 [G, N / 8]
    s_ptr,  # [G, N]
    gidx_ptr,  # int32 [K] (read only with SCALE_MODE 2)
    bias_ptr,  # [N] (read only with HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype, or fp32 partials [splits, M, N] with WRITE_PARTIALS
    M,
    N,
    K,
    group_size,
    k_per_split,
    stride_xm,
    ZERO_OFFSET: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0: one group per tile; 1: group (k0 + 8r) // group_size; 2: g_idx
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 128: 8 dots over BLOCK_K / 8 >= 16 rows each
    DOT_PRECISION: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    WORD_ROWS: tl.constexpr = BLOCK_K // 8

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, WORD_ROWS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % 8) * 4  # [BLOCK_N]: nibble of each column's zero in its qzeros word
    packed_n = N // 8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # a multiple of 8, as K is
    for k0 in range(k_begin, k_end, BLOCK_K):
        # Word row r of the tile holds input rows 8r .. 8r + 7; the i-th dot takes rows 8r + i of
        # every word row, so each word is loaded once and x is read with a stride of 8.
        rows = k0 + 8 * offs_r  # [WORD_ROWS]: first input row of each word row
        mask_r = rows < k_end
        mask_rn = mask_r[:, None] & mask_n[None, :]
        x_rows = x_ptr + offs_m[:, None] * stride_xm + rows[None, :]  # [BLOCK_M, WORD_ROWS]
        mask_x = mask_m[:, None] & mask_r[None, :]
        words = tl.load(qw_ptr + (rows // 8)[:, None] * N + offs_n[None, :], mask=mask_rn, other=0)
        if SCALE_MODE == 0:
            # The tile lies in one group: dots over the exact integers q - z, scaled per column after.
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
            zw = tl.load(qz_ptr + g * packed_n + offs_n // 8, mask=mask_n, other=0)
            z = ((zw >> zero_shift) & 0xF) + ZERO_OFFSET  # int32 [BLOCK_N]
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(8):
                x = tl.load(x_rows + i, mask=mask_x, other=0.0)  # [BLOCK_M, WORD_ROWS]
                q = _centered_nibbles(words, i, z, x.dtype, MAGIC)  # [WORD_ROWS, BLOCK_N], exact
                part = tl.dot(x, q, part, input_precision=DOT_PRECISION)
            acc += part * s[None, :]
        elif SCALE_MODE == 1:
            # A group is a whole number of word rows: one scale and zero row per word row.
            g = rows // group_size  # [WORD_ROWS]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_rn, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g[:, None] * packed_n + (offs_n // 8)[None, :], mask=mask_rn, other=0)
            zs = -(((zw >> zero_shift[None, :]) & 0xF) + ZERO_OFFSET).to(tl.float32) * s  # -zero * scale
            for i in tl.static_range(8):
                x = tl.load(x_rows + i, mask=mask_x, other=0.0)
                w = (_nibbles(words, i, tl.float32, MAGIC) * s + zs).to(x.dtype)  # [WORD_ROWS, BLOCK_N]
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        else:
            # Act-order: every input row's own group from g_idx.
            for i in tl.static_range(8):
                x = tl.load(x_rows + i, mask=mask_x, other=0.0)
                g = tl.load(gidx_ptr + rows + i, mask=mask_r, other=0)  # [WORD_ROWS]
                s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_rn, other=0.0).to(tl.float32)
                zw = tl.load(qz_ptr + g[:, None] * packed_n + (offs_n // 8)[None, :], mask=mask_rn, other=0)
                z = (((zw >> zero_shift[None, :]) & 0xF) + ZERO_OFFSET).to(tl.float32)
                w = ((_nibbles(words, i, tl.float32, MAGIC) - z) * s).to(x.dtype)
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

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
    if block_k % MIN_BLOCK_K or block_k & (block_k - 1):
        raise ValueError(f"w4a16_matmul: block_k must be a power of two >= {MIN_BLOCK_K}, got {block_k}")
    if g_idx is None and group_size != -1 and group % 8:
        raise ValueError(f"w4a16_matmul: group size {group_size} is not a multiple of 8")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    # Mode 0 when no tile straddles a group: the group size is a multiple of the tile, or one group.
    if g_idx is not None:
        scale_mode = 2
    elif group_size == -1 or group % block_k == 0:
        scale_mode = 0
    else:
        scale_mode = 1
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
        SCALE_MODE=scale_mode,
        HAS_BIAS=bias is not None and split_k == 1,
        WRITE_PARTIALS=split_k > 1,
        MAGIC=cfg.magic,
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
