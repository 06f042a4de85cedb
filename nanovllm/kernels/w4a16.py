"""Triton W4A16 GEMM: y = x W^T with W in 4 bits (the internal layout of `quantization/int4_utils.py`),
x in fp16/bf16 (fp32 too, for tests), accumulation in fp32.

The weight tile. A loop iteration loads int32 words of `qweight` [in / 8, out] as a [BLOCK_N, BLOCK_K / 8]
tile (each word once; the BLOCK_N words of a row are contiguous in memory), repeats every word 8 times
along K inside its thread (three `tl.interleave`s) and takes nibble i from copy i: a [BLOCK_N, BLOCK_K]
tile of 4-bit values in input-row order (row 8r + i is nibble i of word row r) whose K runs inside each
thread, so the dequantized tile reaches shared memory in vector stores. (A reshape of a [rows, 8, BLOCK_N]
tensor gives the same values in a layout stored one element at a time: 66 shared stores per thread and
iteration against 10-12 compiled for sm_90, though on the H200 both timed within 10% of each other.)

Scales and zeros. When the K tile lies inside one group (the default configurations make BLOCK_K divide
the group size; one group per channel always does) the tile is dequantized to the exact integers
q - z (-16..15, which every float dtype holds), dotted with x, and the product scaled per column:
sum_k x_k (q_kn - z_n) s_n = s_n sum_k x_k (q_kn - z_n). q - z is made without an int-to-float
conversion: a nibble or'ed into the low mantissa bits of a power of two 2^p (2^23 in fp32, 1024 in fp16,
128 in bf16) is the float 2^p + q, and (2^p + q) - (2^p + z) is exact. On a CUDA device the tl.dot path
does this two values per instruction in inline PTX (`_centered_words`). Otherwise (groups smaller than the
tile, GPTQ act-order groups gathered through `g_idx`) every row takes its own scale and zero, and the
dequantized weights are rounded to x's dtype before the dot.

How rows are multiplied. Up to GEMV_MAX_M rows (decode batches of 1-2 streams) with no act-order
groups: `_w4a16_gemv_kernel`, on CUDA cores, each thread holding whole columns of a [rows, columns] word
tile loaded straight into registers; q - z in fp32 by one lop3 and one fma per weight (`_nibble_minus_zero`),
one fma per weight and row of x, the sum over the tile's rows inside the thread. Otherwise one row of x
(BLOCK_M 1) on CUDA cores in the tiled kernel: products accumulated in a [BLOCK_N, BLOCK_K] fp32 tile,
summed over K once after the loop. From 16 rows (the
smallest tensor-core tile) with tl.dot, by default with the weight tile as the first operand (`swap_ab`:
output columns in the MMA's M, the few rows of x in its N). The K loop is a `tl.range` with the
configuration's stages, so the weight loads are software-pipelined on either path. Decode batches (up to
DECODE_MAX_M rows) are bandwidth-bound: K is split over several programs (split-K) until the grid covers
the SMs, each writes fp32 partials, and a second small kernel adds them (and the bias) in a fixed order.
Prefill batches (DEQUANT_MIN_M rows or more) dequantize the weights once into a temporary and call
cuBLAS; the tiled kernel (large tiles, no split) serves them when a configuration is given. The launch
configuration depends on tensor shapes only and nothing is read back to the host, so decode can be
captured in a CUDA graph.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.device import interpreting

# ---------------------------------------------------------------------------------------------------------
# Tunables: first guesses for an H200 (to be tuned with benchmarks/bench_w4a16.py --sweep).
# ---------------------------------------------------------------------------------------------------------
# One row of x (a single decode stream) multiplies on CUDA cores (BLOCK_M 1), its loads pipelined over
# NUM_STAGES; measured on the H200 (bench_w4a16.py --sweep --sweep-m 1, 4096x12288 and 12288x4096): 26.8
# and 27.5 us at these tiles with 4-16 splits, against 28-30 us at BLOCK_K 128 or without pipelining.
CUDA_CORE_BLOCK_N = 64
CUDA_CORE_BLOCK_K = 64
CUDA_CORE_PROGRAMS_PER_SM = 8
CUDA_CORE_NUM_WARPS = 4
CUDA_CORE_NUM_STAGES = 4
# Up to GEMV_MAX_M rows (a tile in one group, no act-order g_idx) the CUDA-core GEMV `_w4a16_gemv_kernel`
# runs instead: words straight into registers (no shared-memory staging), 2 instructions per weight to
# make q - z, one fused multiply-add per weight and row. Measured on the H200 (bench_w4a16.py --sweep
# --sweep-family gemv, 4096x12288 / 12288x4096, graph replays after do_bench's L2 flush): one row 24.0 /
# 27.0 us at these tiles with 16 splits (the tiled kernel's CUDA-core path 27.8 / 29.6), two rows 29.4 /
# 32.4 (tl.dot at 16 rows 33-35); at four rows tl.dot leads (32.9 / 33.2 against 34.1 / 48.0).
GEMV_MAX_M = 2
GEMV_BLOCK_N = 256
GEMV_BLOCK_K = 128  # 16 word rows per loop iteration
GEMV_NUM_WARPS = 4
GEMV_NUM_STAGES = 1
GEMV_PROGRAMS_PER_SM = 6
GEMV_MIN_K_PER_SPLIT = 256
GEMV_MAX_SPLITS = 16
# Rows of x up to which a launch is a decode launch (split-K, BLOCK_M the next power of two >= 16).
# The weight tile as the dot's first operand (output columns in the MMA's M) measured 36 us against 39-55
# for the x-first order at M 4-16.
DECODE_MAX_M = 64
DECODE_SWAP_AB = True
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
# From this many rows on (with no explicit configuration) the weights are dequantized into a temporary
# [N, K] tensor and multiplied by cuBLAS (as vLLM's AWQ path does at large batches): the tiled kernel's
# dequantization inside every tile costs more than writing the weights once at these sizes.
DEQUANT_MIN_M = 65
DEQUANT_BLOCK_N = 64
DEQUANT_BLOCK_K = 128
# Prefill tiles (no split).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_M_LARGE = 128  # from 4 x this many rows on
PREFILL_BLOCK_N = 128
PREFILL_BLOCK_K = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_WARPS_LARGE = 8
PREFILL_NUM_STAGES = 3
# fp32 activations (tests): narrower tiles keep shared memory in bounds.
FP32_BLOCK_N = 64
FP32_BLOCK_K = 64
# q - z by the power-of-two trick (see `_centered`) rather than an int-to-float conversion.
MAGIC_CONVERT = True
# ... and, on a CUDA device, two values at a time in inline PTX (see `_centered_words`).
PACKED_DEQUANT = True
# The smallest K tile: tl.dot needs 16 rows.
MIN_BLOCK_K = 16
# The smallest M tile of tl.dot: smaller BLOCK_M multiplies on CUDA cores.
DOT_MIN_M = 16
# The split-K reduction kernel: output columns per program.
REDUCE_BLOCK_N = 256

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch configuration. `block_m` 1 multiplies on CUDA cores, 16 or more with tl.dot; `block_k`:
    input rows per loop iteration, a power of two >= 16; `magic`: the conversion of `_centered`;
    `swap_ab`: the dot takes the weight tile as its first operand (output columns in the MMA's M);
    `packed`: `_centered_words` dequantizes two values per instruction in inline PTX where it can (a
    CUDA device, 16-bit activations, a tile in one group, tl.dot); `gemv`: `_w4a16_gemv_kernel`
    (`block_m` 1, 2 or 4 rows per program, `block_k` a power of two >= 8 inside one group); `prefetch`
    (gemv only): the GEMV loads the next tile's words before it multiplies the current one's."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    magic: bool = MAGIC_CONVERT
    swap_ab: bool = False
    packed: bool = PACKED_DEQUANT
    gemv: bool = False
    prefetch: bool = False


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fit_group(block_k: int, group: int, smallest: int = MIN_BLOCK_K) -> int:
    """The K tile, shrunk (not below `smallest`) until it divides the group where that is possible, so
    that every tile lies in one group."""
    while block_k > smallest and group % block_k:
        block_k //= 2
    return block_k


def _splits(tiles: int, per_sm: int, k: int, min_k: int, device: torch.device) -> int:
    """Split-K: enough programs for `per_sm` on every SM, each with at least `min_k` input rows."""
    if device.type == "cuda":
        wanted = max(1, per_sm * _sm_count(device.index or 0) // tiles)
    else:
        wanted = DECODE_DEFAULT_SPLITS_CPU
    return max(1, min(wanted, k // min_k))


def default_config(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    group: int | None = None,
    act_order: bool = False,
) -> W4A16Config:
    """The launch configuration for x [m, k] times a 4-bit [k, n] weight (shapes only); `group`: input
    rows per scale group (None or k: one group); `act_order`: groups read from g_idx."""
    group = k if group is None or group == -1 else group
    if m <= GEMV_MAX_M and not act_order:
        rows = min(_next_pow2(m), 4)
        block_k = _fit_group(GEMV_BLOCK_K, group, smallest=8)
        tiles = triton.cdiv(n, GEMV_BLOCK_N) * triton.cdiv(m, rows)
        split = _splits(tiles, GEMV_PROGRAMS_PER_SM, k, max(GEMV_MIN_K_PER_SPLIT, block_k), device)
        split = min(split, GEMV_MAX_SPLITS)
        return W4A16Config(rows, GEMV_BLOCK_N, block_k, split, GEMV_NUM_WARPS, GEMV_NUM_STAGES, gemv=True)
    if m > DECODE_MAX_M:
        large = m >= 4 * PREFILL_BLOCK_M_LARGE
        block_n, block_k = PREFILL_BLOCK_N, PREFILL_BLOCK_K
        if dtype == torch.float32:
            block_n, block_k = FP32_BLOCK_N, FP32_BLOCK_K
        return W4A16Config(
            block_m=PREFILL_BLOCK_M_LARGE if large else PREFILL_BLOCK_M,
            block_n=block_n,
            block_k=_fit_group(block_k, group),
            split_k=1,
            num_warps=PREFILL_NUM_WARPS_LARGE if large else PREFILL_NUM_WARPS,
            num_stages=PREFILL_NUM_STAGES,
        )
    if m == 1:  # on CUDA cores
        block_m, block_n, block_k, swap = 1, CUDA_CORE_BLOCK_N, CUDA_CORE_BLOCK_K, False
        warps, stages, per_sm = CUDA_CORE_NUM_WARPS, CUDA_CORE_NUM_STAGES, CUDA_CORE_PROGRAMS_PER_SM
    else:
        block_m, block_n, block_k = max(DOT_MIN_M, _next_pow2(m)), DECODE_BLOCK_N, DECODE_BLOCK_K
        if dtype == torch.float32:
            block_n, block_k = FP32_BLOCK_N, FP32_BLOCK_K
        warps, stages, per_sm = DECODE_NUM_WARPS, DECODE_NUM_STAGES, DECODE_PROGRAMS_PER_SM
        swap = DECODE_SWAP_AB
    block_k = _fit_group(block_k, group)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = _splits(tiles, per_sm, k, max(DECODE_MIN_K_PER_SPLIT, block_k), device)
    return W4A16Config(block_m, block_n, block_k, split, warps, stages, swap_ab=swap)


@triton.jit
def _centered(q, z, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """q - z as exact values in `dtype`, for 4-bit values q (int32 0..15) and integer zeros z (int32
    0..16, broadcastable to q). MAGIC: q or'ed into the mantissa of a power of two 2^p is the float
    2^p + q (the 16-bit ones through an int16 bitcast), and 2^p + z is exact too, so is their difference."""
    if MAGIC:
        if dtype == tl.float32:
            hi = (q | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
            return hi - (z + 8388608).to(tl.float32)
        elif dtype == tl.float16:
            hi = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q
            return hi - (z + 1024).to(tl.float16)
        else:
            hi = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q
            return hi - (z + 128).to(tl.bfloat16)
    return (q - z).to(dtype)


def _dequant_asm(magic: int, one: int, fma: str) -> str:
    """The PTX of `_centered_words` for one 16-bit type: its 2^p and 1 (bit patterns) and packed FMA."""
    lines = [f"mov.b32 one, {one * 0x10001:#x};"]
    lines += [f"shr.u32 t{i}, $8, {4 * i};" for i in (1, 2, 3)]
    lines += [
        f"lop3.b32 t{i}, {'$8' if i == 0 else f't{i}'}, 0x000F000F, {magic * 0x10001:#x}, 0xEA;"
        for i in range(4)
    ]
    lines += [f"{fma} t{i}, t{i}, one, $9;" for i in range(4)]
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t{i};" for i in range(4)]
    return "{\n.reg .b32 t0, t1, t2, t3, one;\n" + "\n".join(lines) + "\n}"


_DEQUANT_BF16 = tl.constexpr(_dequant_asm(0x4300, 0x3F80, "fma.rn.bf16x2"))  # 128 and 1.0 in bf16
_DEQUANT_FP16 = tl.constexpr(_dequant_asm(0x6400, 0x3C00, "fma.rn.f16x2"))  # 1024 and 1.0 in fp16
# Its operands: the 8 values out (nibbles 0, 4, 1, 5, 2, 6, 3, 7: the halves of the 4 packed results),
# the word and -(2^p + z) in both halves in.
_DEQUANT_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r")


@triton.jit
def _centered_words(words, z, dtype: tl.constexpr, BLOCK_K: tl.constexpr):
    """The exact q - z in `dtype` (fp16 or bf16) of int32 words [BLOCK_N, BLOCK_K / 8] (8 nibbles each,
    nibble i input row 8r + i) with integer zeros z (int32 [BLOCK_N, 1], 0..16), as a [BLOCK_N, BLOCK_K]
    tile in input-row order, two values per instruction in inline PTX (a CUDA device only).

    A word and 0x000F000F keeps nibbles 0 and 4 in the low bits of its two halves; or'ed (one lop3) with
    the bit pattern of 2^p twice (0x4300 is bf16's 128, 0x6400 fp16's 1024) the halves are 2^p + q, and
    one packed fused multiply-add by 1 with -(2^p + z) in both halves leaves q - z exactly. The word
    shifted by 4, 8 and 12 gives nibbles 1 and 5, 2 and 6, 3 and 7: 3 shifts, 4 lop3 and 4 packed FMAs
    make 8 values, where one value at a time takes about 4 instructions."""
    if dtype == tl.bfloat16:
        neg = tl.broadcast_to(
            z * 65537 - 1023360256, words.shape
        )  # -(128 + z) twice: 0xC300C300 + z * 0x10001
        n0, n4, n1, n5, n2, n6, n3, n7 = tl.inline_asm_elementwise(
            _DEQUANT_BF16, _DEQUANT_CONSTRAINTS, [words, neg], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
        )
    else:
        neg = tl.broadcast_to(
            z * 65537 - 469703680, words.shape
        )  # -(1024 + z) twice: 0xE400E400 + z * 0x10001
        n0, n4, n1, n5, n2, n6, n3, n7 = tl.inline_asm_elementwise(
            _DEQUANT_FP16, _DEQUANT_CONSTRAINTS, [words, neg], dtype=(tl.float16,) * 8, is_pure=True, pack=1
        )
    # join(a, b) stacks along a new last axis, so the outermost join picks the lowest bit of the position
    # in [..., 2, 2, 2]: even nibbles first, then bit 1, and the innermost join (the asm's pairs) bit 2.
    even = tl.join(tl.join(n0, n4), tl.join(n2, n6))
    odd = tl.join(tl.join(n1, n5), tl.join(n3, n7))
    return tl.reshape(tl.join(even, odd), (words.shape[0], BLOCK_K))


@triton.jit
def _nibble_words(qw_ptr, offs_n, mask_n, k0, k_end, N, BLOCK_K: tl.constexpr):
    """The words of q[k0 : k0 + BLOCK_K, offs_n] as an int32 [BLOCK_N, BLOCK_K / 8] tile (word rows at
    or past k_end 0; the BLOCK_N words of a row are contiguous in memory)."""
    word_rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask_w = mask_n[:, None] & (word_rows * 8 < k_end)[None, :]
    return tl.load(qw_ptr + word_rows[None, :] * N + offs_n[:, None], mask=mask_w, other=0)


@triton.jit
def _nibble_tile(qw_ptr, offs_n, mask_n, k0, k_end, N, BLOCK_K: tl.constexpr):
    """The 4-bit values q[k0 : k0 + BLOCK_K, offs_n] as an int32 [BLOCK_N, BLOCK_K] tile (rows past k_end
    0): words [BLOCK_N, BLOCK_K / 8] (columns contiguous in memory), each repeated 8 times along K inside
    its thread, then nibble i taken from copy i (input row 8r + i)."""
    words = _nibble_words(qw_ptr, offs_n, mask_n, k0, k_end, N, BLOCK_K)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)  # [BLOCK_N, BLOCK_K]
    nibble_shift = (tl.arange(0, BLOCK_K) % 8) * 4
    return (words >> nibble_shift[None, :]) & 0xF


@triton.jit
def _row_scales_zeros(
    qz_ptr,
    s_ptr,
    gidx_ptr,
    offs_n,
    mask_n,
    offs_k,
    mask_k,
    N,
    group_size,
    ZERO_OFFSET: tl.constexpr,
    HAS_GIDX: tl.constexpr,
):
    """Every element's scale (fp32) and integer zero point, [BLOCK_N, BLOCK_K], its input row's group
    read from g_idx or k // group_size."""
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)  # [BLOCK_K]
    else:
        g = offs_k // group_size
    mask_nk = mask_n[:, None] & mask_k[None, :]
    s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=mask_nk, other=0.0).to(tl.float32)
    zw = tl.load(qz_ptr + g[None, :] * (N // 8) + (offs_n // 8)[:, None], mask=mask_nk, other=0)
    z = ((zw >> ((offs_n % 8) * 4)[:, None]) & 0xF) + ZERO_OFFSET
    return s, z


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K], rows stride_xm apart
    qw_ptr,  # int32 [K / 8, N]
    qz_ptr,  # int32 [G, N / 8]
    s_ptr,  # [G, N]
    gidx_ptr,  # int32 [K] (read only with HAS_GIDX)
    bias_ptr,  # [N] (read only with HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype, or fp32 partials [splits, M, N] with WRITE_PARTIALS
    M,
    N,
    K,
    group_size,
    k_per_split,
    stride_xm,
    ZERO_OFFSET: tl.constexpr,
    ROW_GROUPS: tl.constexpr,  # every input row its own group (else a tile lies in one group)
    HAS_GIDX: tl.constexpr,  # ... read from g_idx (else k // group_size)
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    MAGIC: tl.constexpr,
    PACKED: tl.constexpr,  # `_centered_words` (only with tl.dot, 16-bit x, a tile in one group, CUDA)
    SWAP_AB: tl.constexpr,  # tl.dot(W tile, x^T): the output tile transposed (BLOCK_N the dot's M)
    BLOCK_M: tl.constexpr,  # 1: CUDA-core multiply-adds; else (16 or more) tl.dot
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of two >= 16
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # loads in flight: the loop is software-pipelined on CUDA cores too
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    USE_DOT: tl.constexpr = BLOCK_M >= 16

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % 8) * 4  # [BLOCK_N]: nibble of each column's zero in its qzeros word
    packed_n = N // 8

    if USE_DOT and SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # one row (BLOCK_M 1): products summed over K once, after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # a multiple of 8, as K is
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask_x = mask_m[:, None] & mask_k[None, :]
        if not PACKED:
            q = _nibble_tile(qw_ptr, offs_n, mask_n, k0, k_end, N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        if not ROW_GROUPS:
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
            zw = tl.load(qz_ptr + g * packed_n + offs_n // 8, mask=mask_n, other=0)
            z = ((zw >> zero_shift) & 0xF) + ZERO_OFFSET  # int32 [BLOCK_N]
            if USE_DOT:
                if PACKED:
                    words = _nibble_words(qw_ptr, offs_n, mask_n, k0, k_end, N, BLOCK_K)
                    w = _centered_words(words, z[:, None], x_ptr.dtype.element_ty, BLOCK_K)
                else:
                    w = _centered(q, z[:, None], x_ptr.dtype.element_ty, MAGIC)  # [BLOCK_N, BLOCK_K], exact
                if SWAP_AB:
                    xt = tl.load(
                        x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                        mask=tl.trans(mask_x),
                        other=0.0,
                    )
                    acc += tl.dot(w, xt, input_precision=DOT_PRECISION) * s[:, None]
                else:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_x, other=0.0)
                    acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION) * s[None, :]
            else:
                x = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                acc += _centered(q, z[:, None], tl.float32, MAGIC) * s[:, None] * x[None, :]
        else:
            s, z = _row_scales_zeros(
                qz_ptr, s_ptr, gidx_ptr, offs_n, mask_n, offs_k, mask_k, N, group_size, ZERO_OFFSET, HAS_GIDX
            )
            w = (_centered(q, z, tl.float32, MAGIC) * s).to(x_ptr.dtype.element_ty)
            if USE_DOT and SWAP_AB:
                xt = tl.load(
                    x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=tl.trans(mask_x), other=0.0
                )
                acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
            elif USE_DOT:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_x, other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            else:
                x = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                acc += w.to(tl.float32) * x[None, :]
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    elif SWAP_AB:
        acc = tl.trans(acc)

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
def _nibble_minus_zero(words, i: tl.constexpr, z):
    """q_i - z exactly in fp32 for nibble i of every int32 word (z: fp32 zero points, broadcastable).

    The nibble is masked in place and or'ed into the bits of 2^23 (one lop3): the float 2^23 + q 2^e,
    e = 4i (nibbles 0-4 lie inside the 23-bit mantissa; 5-7 after one shift of the word by 12, at e 8-16),
    and one fma by 2^-e with -(2^(23-e) + z) leaves q - z (every step exact)."""
    if i < 5:
        bits = (words & (0xF << (4 * i))) | 0x4B000000
        inv = 1.0 / (1 << (4 * i))
    else:
        bits = ((words >> 12) & (0xF << (4 * (i - 3)))) | 0x4B000000
        inv = 1.0 / (1 << (4 * (i - 3)))
    return bits.to(tl.float32, bitcast=True) * inv - (8388608.0 * inv + z)


@triton.jit
def _gemv_products(w, x_row, k0, rows, i: tl.constexpr, mask_r, EVEN_K: tl.constexpr):
    """w [BLOCK_R, BLOCK_N] times x[k0 + 8r + i] along its rows (fp32)."""
    if EVEN_K:
        xi = tl.load(x_row + k0 + 8 * rows + i)
    else:
        xi = tl.load(x_row + k0 + 8 * rows + i, mask=mask_r, other=0.0)
    return w * xi.to(tl.float32)[:, None]


@triton.jit
def _gemv_tile(
    qw_ptr,
    s_ptr,
    qz_ptr,
    k0,
    k_end,
    rows,
    offs_n,
    mask_n,
    zero_shift,
    N,
    group_size,
    ZERO_OFFSET: tl.constexpr,
    EVEN_K: tl.constexpr,
    PAST_END: tl.constexpr,
):
    """The GEMV's loads for the tile at input row k0: its words [BLOCK_R, BLOCK_N], its group's scales
    and zero points (fp32, [BLOCK_N]). PAST_END: k0 may lie at or past k_end (a prefetch after the
    split's last tile), which then reads nothing."""
    word_rows = k0 // 8 + rows
    if EVEN_K and not PAST_END:
        mask_w = mask_n[None, :]
    else:
        mask_w = (word_rows * 8 < k_end)[:, None] & mask_n[None, :]
    mask_g = mask_n
    if PAST_END:  # (compared as a vector: a scalar condition and'ed into a mask breaks the interpreter)
        mask_g = mask_g & (offs_n * 0 + k0 < k_end)
    words = tl.load(qw_ptr + word_rows[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
    g = k0 // group_size
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)
    zw = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=mask_g, other=0)
    return words, s, (((zw >> zero_shift) & 0xF) + ZERO_OFFSET).to(tl.float32)


@triton.jit
def _gemv_store(out_ptr, acc, bias_ptr, row, M, N, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    mask = mask_n & (tl.full(offs_n.shape, row, tl.int32) < M)
    tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [M, K], rows stride_xm apart
    qw_ptr,  # int32 [K / 8, N]
    qz_ptr,  # int32 [G, N / 8]
    s_ptr,  # [G, N]
    bias_ptr,  # [N] (read only with HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype, or fp32 partials [splits, M, N] with WRITE_PARTIALS
    M,
    N,
    K,
    group_size,
    k_per_split,
    stride_xm,
    ZERO_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no row masks
    BLOCK_M: tl.constexpr,  # rows of x per program: 1, 2 or 4
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # word rows per iteration (BLOCK_K = 8 BLOCK_R inside one group)
    NUM_STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next tile before multiplying this one (in registers, no staging)
):
    """A few rows of x on CUDA cores. Every thread holds whole columns of the [BLOCK_R, BLOCK_N] word tile
    (the columns contiguous in memory, loaded straight into registers), so the products of all 8 nibbles
    accumulate in place and the sum over the tile's rows stays inside the thread; the group's scale
    multiplies that sum once per iteration (the tile lies in one group). One accumulator per row of x,
    written out (the rows past M read row M - 1 and are not stored). With PREFETCH each iteration
    issues the next tile's loads first, so they are in flight while this tile is multiplied: the loads
    alone reached only 1.8 TB/s on the H200 with one tile in flight a program (RESULTS, eighth session)."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    BLOCK_K: tl.constexpr = 8 * BLOCK_R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_R)
    zero_shift = (offs_n % 8) * 4
    row0 = pid_m * BLOCK_M
    x0 = x_ptr + row0 * stride_xm
    x1 = x_ptr + tl.minimum(row0 + 1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(row0 + 2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(row0 + 3, M - 1) * stride_xm
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if PREFETCH:
        next_words, next_s, next_z = _gemv_tile(
            qw_ptr, s_ptr, qz_ptr, k_begin, k_end, rows, offs_n, mask_n, zero_shift, N, group_size,
            ZERO_OFFSET, EVEN_K, True,
        )  # fmt: skip
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if PREFETCH:
            words, s, z = next_words, next_s, next_z
            next_words, next_s, next_z = _gemv_tile(
                qw_ptr, s_ptr, qz_ptr, k0 + BLOCK_K, k_end, rows, offs_n, mask_n, zero_shift, N, group_size,
                ZERO_OFFSET, EVEN_K, True,
            )  # fmt: skip
        else:
            words, s, z = _gemv_tile(
                qw_ptr, s_ptr, qz_ptr, k0, k_end, rows, offs_n, mask_n, zero_shift, N, group_size,
                ZERO_OFFSET, EVEN_K, False,
            )  # fmt: skip
        mask_r = (k0 // 8 + rows) * 8 < k_end
        z = z[None, :]
        p0 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(8):
            w = _nibble_minus_zero(words, i, z)  # [BLOCK_R, BLOCK_N]
            p0 += _gemv_products(w, x0, k0, rows, i, mask_r, EVEN_K)
            if BLOCK_M > 1:
                p1 += _gemv_products(w, x1, k0, rows, i, mask_r, EVEN_K)
            if BLOCK_M > 2:
                p2 += _gemv_products(w, x2, k0, rows, i, mask_r, EVEN_K)
                p3 += _gemv_products(w, x3, k0, rows, i, mask_r, EVEN_K)
        acc0 += tl.sum(p0, axis=0) * s
        if BLOCK_M > 1:
            acc1 += tl.sum(p1, axis=0) * s
        if BLOCK_M > 2:
            acc2 += tl.sum(p2, axis=0) * s
            acc3 += tl.sum(p3, axis=0) * s
    out = out_ptr + pid_k * M * N if WRITE_PARTIALS else out_ptr
    _gemv_store(out, acc0, bias_ptr, row0, M, N, offs_n, mask_n, HAS_BIAS)
    if BLOCK_M > 1:
        _gemv_store(out, acc1, bias_ptr, row0 + 1, M, N, offs_n, mask_n, HAS_BIAS)
    if BLOCK_M > 2:
        _gemv_store(out, acc2, bias_ptr, row0 + 2, M, N, offs_n, mask_n, HAS_BIAS)
        _gemv_store(out, acc3, bias_ptr, row0 + 3, M, N, offs_n, mask_n, HAS_BIAS)


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


@triton.jit
def _dequantize_kernel(
    qw_ptr,  # int32 [K / 8, N]
    qz_ptr,  # int32 [G, N / 8]
    s_ptr,  # [G, N]
    gidx_ptr,  # int32 [K] (read only with HAS_GIDX)
    out_ptr,  # [N, K]: W, in the activations' dtype
    N,
    K,
    group_size,
    ZERO_OFFSET: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    q = _nibble_tile(qw_ptr, offs_n, mask_n, k0, K, N, BLOCK_K)
    s, z = _row_scales_zeros(
        qz_ptr, s_ptr, gidx_ptr, offs_n, mask_n, offs_k, mask_k, N, group_size, ZERO_OFFSET, HAS_GIDX
    )
    w = (q - z).to(tl.float32) * s
    out = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


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
    if config is None and m >= DEQUANT_MIN_M:
        w = w4a16_dequantize(qweight, qzeros, scales, group_size, zero_offset, g_idx, x.dtype)
        return F.linear(x, w, bias)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    cfg = config or default_config(m, n, k, x.dtype, x.device, group, act_order=g_idx is not None)
    block_k = cfg.block_k
    if g_idx is None and group_size != -1 and group % 8:
        raise ValueError(f"w4a16_matmul: group size {group_size} is not a multiple of 8")
    if cfg.gemv:
        return _gemv(x, qweight, qzeros, scales, group, zero_offset, g_idx, bias, cfg, out)
    if cfg.prefetch:
        raise ValueError("w4a16_matmul: prefetch is an option of the gemv configuration only")
    if block_k < MIN_BLOCK_K or block_k & (block_k - 1):
        raise ValueError(f"w4a16_matmul: block_k must be a power of two >= {MIN_BLOCK_K}, got {block_k}")
    if cfg.block_m != 1 and (cfg.block_m < DOT_MIN_M or cfg.block_m & (cfg.block_m - 1)):
        raise ValueError(
            f"w4a16_matmul: block_m must be 1 or a power of two >= {DOT_MIN_M}, got {cfg.block_m}"
        )
    k_per_split, split_k, target, grid = _split_launch(x, n, cfg, out)
    # A tile lies in one group when the group size is a multiple of the tile, or there is one group.
    row_groups = g_idx is not None or (group_size != -1 and group % block_k != 0)
    packed = (
        cfg.packed
        and cfg.block_m >= DOT_MIN_M
        and not row_groups
        and x.dtype != torch.float32
        and x.is_cuda
        and not interpreting()
    )
    dummy = qweight  # never read: a valid pointer for the unused optional arguments
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
        ROW_GROUPS=row_groups,
        HAS_GIDX=g_idx is not None,
        HAS_BIAS=bias is not None and split_k == 1,
        WRITE_PARTIALS=split_k > 1,
        MAGIC=cfg.magic,
        PACKED=packed,
        SWAP_AB=cfg.swap_ab,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split_k > 1:
        _reduce_splits(target, bias, out)
    return out


def _split_launch(
    x: Tensor, n: int, cfg: W4A16Config, out: Tensor
) -> tuple[int, int, Tensor, tuple[int, int]]:
    """Input rows per split (a multiple of the K tile), the splits that leaves, where the kernel writes
    (`out`, or fp32 partials [splits, M, N]) and the grid (row tiles x column tiles, splits)."""
    m, k = x.shape
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    target = out if split_k == 1 else torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    return k_per_split, split_k, target, grid


def _reduce_splits(partials: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out = the sum of fp32 partials [splits, M, N] in a fixed order (+ bias)."""
    splits, m, n = partials.shape
    _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK_N))](
        partials,
        bias if bias is not None else partials,
        out,
        m,
        n,
        splits,
        HAS_BIAS=bias is not None,
        BLOCK_N=REDUCE_BLOCK_N,
    )


def _gemv(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    group: int,
    zero_offset: int,
    g_idx: Tensor | None,
    bias: Tensor | None,
    cfg: W4A16Config,
    out: Tensor,
) -> Tensor:
    """`w4a16_matmul` through `_w4a16_gemv_kernel` (shapes checked there; `group`: rows per group)."""
    m, k = x.shape
    n = qweight.shape[1]
    if g_idx is not None:
        raise ValueError("w4a16_matmul: the gemv configuration cannot read act-order groups (g_idx)")
    if cfg.block_m not in (1, 2, 4):
        raise ValueError(f"w4a16_matmul: a gemv configuration takes 1, 2 or 4 rows, got {cfg.block_m}")
    if cfg.block_k < 8 or cfg.block_k & (cfg.block_k - 1) or group % cfg.block_k:
        raise ValueError(
            f"w4a16_matmul: a gemv block_k must be a power of two >= 8 dividing the group ({group}), "
            f"got {cfg.block_k}"
        )
    k_per_split, split_k, target, grid = _split_launch(x, n, cfg, out)
    _w4a16_gemv_kernel[grid](
        x,
        qweight,
        qzeros,
        scales,
        bias if bias is not None else qweight,
        target,
        m,
        n,
        k,
        group,
        k_per_split,
        x.stride(0),
        ZERO_OFFSET=zero_offset,
        HAS_BIAS=bias is not None and split_k == 1,
        WRITE_PARTIALS=split_k > 1,
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_k // 8,
        NUM_STAGES=cfg.num_stages,
        PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split_k > 1:
        _reduce_splits(target, bias, out)
    return out


def w4a16_dequantize(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    group_size: int,
    zero_offset: int,
    g_idx: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """W [N, K] in `dtype` from the internal 4-bit layout (arguments as `w4a16_matmul`'s, shapes checked
    there): (q - zero) * scale computed in fp32 and rounded once."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    group = k if group_size == -1 else group_size
    out = torch.empty(n, k, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K))
    _dequantize_kernel[grid](
        qweight,
        qzeros,
        scales,
        g_idx if g_idx is not None else qweight,
        out,
        n,
        k,
        group,
        ZERO_OFFSET=zero_offset,
        HAS_GIDX=g_idx is not None,
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=DEQUANT_BLOCK_K,
    )
    return out
