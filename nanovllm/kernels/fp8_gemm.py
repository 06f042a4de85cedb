"""W8A8 FP8 (e4m3) GEMMs with fp32 accumulation: y = x W^T in x's dtype.

- `w8a8_block_matmul`: block-scaled weights (Qwen3-FP8 / DeepSeek-V3: one scale per block_n x block_k
  block) and activations quantized per token and block_k-wide group of input features, inside the
  GEMM: each K tile is one group, so the tile's row maxima give its scales in registers and no
  quantized copy of x is written. Partial last blocks (N or K not a multiple of the block) are masked.
  A tensor-core FP8 dot needs a K tile of at least 32 (and M, N tiles of at least 16) on sm_90, so a
  group narrower than 32 (or not a power of two, or wider than 256) cannot be one K tile: then x is
  quantized per group first, and each K tile spans several groups, both operands dequantized in
  registers (per-element group scales) and multiplied in x's 16-bit dtype (`block_gemm_plan`).
- `w8a8_channel_matmul`: one weight scale per output channel, one activation scale per token
  (vLLM's online FP8). `per_token_quant` writes x in FP8 with its scales (one Triton pass); the GEMM is
  our Triton kernel (split-K where its tiles would not fill the GPU) up to CHANNEL_TRITON_MAX_M rows,
  and above that `torch._scaled_mm` (cuBLASLt row-wise scaling on sm_89+/sm_90) where it applies
  (bf16 output, K and N multiples of 16).

The fp32 -> e4m3 cast is `fp8_cast.to_fp8` (round to nearest, also under TRITON_INTERPRET=1).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.device import sm_count
from nanovllm.kernels.fp8_cast import emulate_cast, to_fp8

FP8_DTYPE = torch.float8_e4m3fn
# From this many rows on, the block GEMM takes x quantized by `per_token_group_quant` first instead of
# quantizing each tile itself (every N tile repeats that work). On the H200 (bench_fp8.py gemm,
# results/2026-12-02c_h200_fp8_195107a.log) quantizing first was faster at every M of the Qwen3-8B
# shapes (e.g. qkv 4096x6144 at M = 1: 14.2 against 19.9 us; down 12288x4096 at M = 2048: 434 against
# 847 us) and at M >= 32 of the 0.6B shapes; at M <= 8 of those it lost at most 0.8 us (8%).
PREQUANTIZE_MIN_M = 1
# Up to this many rows the per-channel GEMM is our Triton kernel, above it torch._scaled_mm: on the
# H200 (same log) the Triton kernel was as fast or faster at every M <= 64 of both models' shapes (8B
# gate/up at M = 1: 29.9 against 46.7 us), cuBLASLt faster from M = 128 (8B qkv: 15.8 against 21.7 us).
CHANNEL_TRITON_MAX_M = 64
# In the kernels: scale = max(amax, 1e-10) / 448 (an all-zero group gets a tiny scale and zeros).
# The smallest K of an FP8 tl.dot on sm_90 (wgmma: 32 bytes of K), and of M and N for any tl.dot.
FP8_DOT_MIN_K = 32
DOT_MIN_MN = 16
# The widest group that is one K tile of the fused kernel (its fp8 tiles stay in shared memory).
FUSED_MAX_GROUP_K = 256
# The K tile of the dequantizing kernel (16-bit dot: K >= 16).
DEQUANT_BLOCK_K = 64
# Arguments of the GEMM kernels that vary with the row count (M; K tiles a split, from the split-K),
# kept out of Triton's specialization (on a value of 1 and on divisibility by 16): otherwise a prefill
# of a new length class compiles a variant of its own in the step that first needs it (seconds), where
# start-up's warm-up prefill compiled the same tiles already. They are only compared and looped over.
ROW_COUNT_ARGS = ("M", "k_tiles_per_split")
# The dequantizing kernel's dot dtype for each x dtype (its DOT_KIND).
DOT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


# ---------------------------------------------------------------------------------------------------
# Block-scaled weights, per-token-group activations
# ---------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=ROW_COUNT_ARGS)
def _block_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cs,
    stride_cm,
    k_tiles_per_split,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_FP8: tl.constexpr,
    DEQUANT: tl.constexpr,
    DOT_KIND: tl.constexpr,
    EMULATE_CAST: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """A_FP8: x arrives quantized (e4m3 with scales [m, ceil(K / GROUP_K)]); else x is quantized
    here, per tile (BLOCK_K == GROUP_K). DEQUANT (with A_FP8): a K tile spans several groups (or
    parts of them); both operands are dequantized with per-element scales and multiplied in
    DOT_KIND's dtype (0: bf16, 1: fp16, 2: fp32). GROUP_M > 1: the grid's first axis numbers the
    output tiles, in launch order GROUP_M row tiles down one column of tiles, then the next column
    (so the programs that run at once share a few rows of x and a few column blocks of W in L2);
    else the grid is (row tiles, column tiles), the row tile fastest."""
    if GROUP_M > 1:
        tile = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        first_m = tile // (GROUP_M * num_n) * GROUP_M
        rows_in_group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        pid_m = first_m + tile % (GROUP_M * num_n) % rows_in_group
        pid_n = tile % (GROUP_M * num_n) // rows_in_group
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    first = split * k_tiles_per_split
    last = tl.minimum(first + k_tiles_per_split, num_k_tiles)
    # One weight-scale row per output column (its block of GROUP_N columns).
    bs_rows = bs_ptr + (offs_n // GROUP_N).to(tl.int64) * stride_bsn
    for kt in range(first, last):
        k = kt * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]: one activation group per row (DEQUANT: several, or part of one)
        b = tl.load(
            b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + k[:, None],
            mask=mask_n[None, :] & mask_k[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N] fp8
        if DEQUANT:
            group = k // GROUP_K  # [BLOCK_K]: each column's scale group
            a_scale = tl.load(
                as_ptr + offs_m[:, None].to(tl.int64) * stride_asm + group[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            b_scale = tl.load(
                bs_rows[None, :] + group[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0
            )  # [BLOCK_K, BLOCK_N]
            a_f = a.to(tl.float32) * a_scale
            b_f = b.to(tl.float32) * b_scale
            if DOT_KIND == 0:
                acc += tl.dot(a_f.to(tl.bfloat16), b_f.to(tl.bfloat16), out_dtype=tl.float32)
            elif DOT_KIND == 1:
                acc += tl.dot(a_f.to(tl.float16), b_f.to(tl.float16), out_dtype=tl.float32)
            else:
                acc += tl.dot(a_f, b_f, input_precision="ieee", out_dtype=tl.float32)
        else:
            if A_FP8:
                a_q = a
                a_scale = tl.load(as_ptr + offs_m.to(tl.int64) * stride_asm + kt, mask=mask_m, other=0.0)
            else:
                a = a.to(tl.float32)
                a_scale = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0  # [BLOCK_M]
                a_q = to_fp8(a / a_scale[:, None], EMULATE_CAST)
            b_scale = tl.load(bs_rows + kt, mask=mask_n, other=0.0)  # [BLOCK_N]
            acc += tl.dot(a_q, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
    c = c_ptr + split * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fill_split(tiles: int, k_tiles: int, num_sms: int) -> int:
    """Split-K factor that brings a grid of `tiles` output tiles to about two programs per SM (at most
    one K tile a split). Decode GEMMs are bound by reading the weight, which a grid of fewer programs
    than SMs cannot do at speed: at 128 rows the 8B shapes' 128 x 128 tiles made 32-48 programs, and
    the GEMM took 2-4x its 64-row time (before this applied beyond 64 rows)."""
    return max(1, min(k_tiles, (2 * num_sms) // max(tiles, 1)))


def split_tiles(k_tiles: int, split_k: int) -> tuple[int, int]:
    """(splits, K tiles per split) for `split_k` requested splits of `k_tiles` K tiles: at least one
    tile a split and no empty split (the last may be shorter)."""
    per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return triton.cdiv(k_tiles, per_split), per_split


def block_gemm_config(m: int, n: int, k_tiles: int, num_sms: int, dequant: bool = False) -> dict:
    """Tile sizes and split-K for an [m, n] output: small m (decode) is bound by reading the weight,
    so the K loop is split until the grid covers the SMs about twice (`fill_split`); large m uses
    bigger tiles. `dequant` (the dequantizing kernel: fp32 operand tiles and per-element scales in
    flight): at most 64 x 64 tiles and 2 stages, so that registers and shared memory suffice (not
    tuned)."""
    if m <= 16:
        block_m, block_n, warps, stages = 16, 64, 4, 4
    elif m <= 64 or dequant:
        block_m, block_n, warps, stages = 64, 64, 4, 4
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    if dequant:
        stages = 2
    split = fill_split(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k_tiles, num_sms)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, split_k=split)


def block_gemm_plan(block_k: int) -> tuple[int, bool]:
    """(BLOCK_K, dequantize) for a block_k-wide scale group: the fused FP8 kernel takes one group per
    K tile, which a tensor-core FP8 dot allows from FP8_DOT_MIN_K on (a power of two up to
    FUSED_MAX_GROUP_K); any other group goes to the dequantizing kernel, whose K tile spans several
    groups (or a part of one) and whose dot is 16-bit (K >= 16)."""
    if block_k & (block_k - 1) == 0 and FP8_DOT_MIN_K <= block_k <= FUSED_MAX_GROUP_K:
        return block_k, False
    return DEQUANT_BLOCK_K, True


def _check_tiles(cfg: dict) -> None:
    for name in ("BLOCK_M", "BLOCK_N"):
        size = cfg.get(name)
        if not isinstance(size, int) or size < DOT_MIN_MN or size & (size - 1):
            raise ValueError(f"config {name} must be a power of two >= {DOT_MIN_MN} (tl.dot), got {size!r}")
    if "BLOCK_K" in cfg:
        raise ValueError("config BLOCK_K is set by the weight block (block_gemm_plan), not by the caller")
    if not isinstance(cfg.get("GROUP_M", 1), int) or cfg.get("GROUP_M", 1) < 1:
        raise ValueError(f"config GROUP_M must be an int >= 1, got {cfg['GROUP_M']!r}")


def block_gemm_launch(
    m: int,
    n: int,
    k: int,
    block: list[int],
    config: dict | None = None,
    prequantize: bool | None = None,
    num_sms: int = 4,
) -> dict:
    """The block GEMM's launch for x [m, k] and W [n, k] in `block` scale blocks: the kernel's tile
    constexprs (BLOCK_M, BLOCK_N, BLOCK_K, A_FP8, DEQUANT, GROUP_M), num_warps / num_stages, and the
    split-K (split, per_split: K tiles per split, no empty split)."""
    block_k_tile, dequant = block_gemm_plan(block[1])
    k_tiles = triton.cdiv(k, block_k_tile)
    cfg = {"GROUP_M": 1, **(config or block_gemm_config(m, n, k_tiles, num_sms, dequant))}
    _check_tiles(cfg)
    split, per_split = split_tiles(k_tiles, int(cfg.pop("split_k", 1)))
    if prequantize is None:
        prequantize = m >= PREQUANTIZE_MIN_M
    return dict(
        cfg,
        BLOCK_K=block_k_tile,
        A_FP8=bool(prequantize or dequant),
        DEQUANT=dequant,
        split=split,
        per_split=per_split,
    )


def w8a8_block_matmul(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block: list[int],
    config: dict | None = None,
    prequantize: bool | None = None,
) -> Tensor:
    """y [m, n] = x [m, k] W^T in x's dtype, W = weight [n, k] (e4m3) times weight_scale
    [ceil(n / block_n), ceil(k / block_k)] (fp32) per block; x quantized per token and block_k group,
    inside the GEMM (or, with `prequantize`, by `per_token_group_quant` first: one more launch, but
    the GEMM then reads one byte per activation; None: from PREQUANTIZE_MIN_M rows on). `config`: tile
    sizes / split-K / GROUP_M, the launch order (default: `block_gemm_config`, GROUP_M 1). A group
    the fused kernel cannot take as one K
    tile (`block_gemm_plan`) is always quantized first, whatever `prequantize` says."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x [m, k] and weight [n, k] expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_k = block
    if weight.dtype != FP8_DTYPE or weight_scale.dtype != torch.float32:
        raise ValueError(
            f"weight must be {FP8_DTYPE} and weight_scale float32, got {weight.dtype}, {weight_scale.dtype}"
        )
    if tuple(weight_scale.shape) != (triton.cdiv(n, block_n), triton.cdiv(k, block_k)):
        raise ValueError(
            f"weight_scale shape {tuple(weight_scale.shape)} does not match weight {n}x{k}, block {block}"
        )
    if x.dtype not in DOT_KINDS:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()  # [m, k]
    if weight.stride(1) != 1 or weight_scale.stride(1) != 1:
        raise ValueError("weight and weight_scale must be row-contiguous")
    launch = block_gemm_launch(m, n, k, block, config, prequantize, sm_count(x.device, cpu_default=4))
    split, per_split = launch.pop("split"), launch.pop("per_split")
    out = _split_output(split, m, n, x.dtype, x.device)
    if m == 0:
        return _sum_splits(out, x.dtype)
    tiles_m, tiles_n = triton.cdiv(m, launch["BLOCK_M"]), triton.cdiv(n, launch["BLOCK_N"])
    grid = (tiles_m * tiles_n, 1, split) if launch["GROUP_M"] > 1 else (tiles_m, tiles_n, split)
    out_dtype = x.dtype
    if launch["A_FP8"]:
        x, x_scale = per_token_group_quant(x, block_k)
    else:
        x_scale = weight_scale  # unused placeholder
    _block_gemm_kernel[grid](
        x,
        x_scale,
        weight,
        weight_scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        x_scale.stride(0),
        weight.stride(0),
        weight_scale.stride(0),
        out.stride(0) if split > 1 else 0,
        n,
        per_split,
        GROUP_N=block_n,
        GROUP_K=block_k,
        DOT_KIND=DOT_KINDS[out_dtype],
        EMULATE_CAST=emulate_cast(),
        **launch,
    )
    return _sum_splits(out, out_dtype)


def _split_output(split: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Where a split-K GEMM writes: [m, n] in the output dtype without a split, else [split, m, n]
    fp32 partial sums (the kernels' split stride is the first dimension's)."""
    if split == 1:
        return torch.empty(m, n, dtype=dtype, device=device)
    return torch.empty(split, m, n, dtype=torch.float32, device=device)


def _sum_splits(out: Tensor, dtype: torch.dtype) -> Tensor:
    """The [m, n] result of `_split_output`'s buffer once the GEMM has written it."""
    return out if out.dim() == 2 else out.sum(0).to(dtype)


@triton.jit
def _group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_CAST: tl.constexpr,
):
    """One (row, group): the group's amax, then its e4m3 values, BLOCK columns at a time (any GROUP)."""
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = group * GROUP
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, GROUP, BLOCK):
        k = start + c + offs
        mask = (c + offs < GROUP) & (k < K)
        x = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-10) / 448.0
    for c in range(0, GROUP, BLOCK):
        k = start + c + offs
        mask = (c + offs < GROUP) & (k < K)
        x = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k, to_fp8(x / scale, EMULATE_CAST), mask=mask)
    tl.store(s_ptr + row * stride_sm + group, scale)


def per_token_group_quant(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [m, k] -> (q [m, k] e4m3, scale [m, ceil(k / group)] fp32): one scale per token and group of
    `group` input features (a partial last group included), x ~ q * scale."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()  # [m, k]
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, triton.cdiv(k, group), dtype=torch.float32, device=x.device)
    if m:
        _group_quant_kernel[(m, triton.cdiv(k, group))](
            x,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            scale.stride(0),
            GROUP=group,
            BLOCK=min(triton.next_power_of_2(group), 1024),
            EMULATE_CAST=emulate_cast(),
        )
    return q, scale


# ---------------------------------------------------------------------------------------------------
# Per-channel weights, per-token activations
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, EMULATE_CAST: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-10) / 448.0
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k0 + offs, to_fp8(x / scale, EMULATE_CAST), mask=mask)
    tl.store(s_ptr + row, scale)


def per_token_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [m, k] -> (q [m, k] e4m3, scale [m, 1] fp32) with x ~ q * scale, one scale per row."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()  # [m, k]
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 1024)
        _per_token_quant_kernel[(m,)](
            x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, EMULATE_CAST=emulate_cast(), num_warps=4
        )
    return q, scale


@triton.jit(do_not_specialize=ROW_COUNT_ARGS)
def _channel_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cs,
    stride_cm,
    k_tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile over split program_id(2)'s K tiles; a split's partial sum is
    scaled too (the scales are constant along K), so the splits' sum is the product."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * k_tiles_per_split
    last = tl.minimum(first + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    for kt in range(first, last):
        k = kt * BLOCK_K + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
            mask=mask_m[:, None] & (k < K)[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K] fp8
        b = tl.load(
            b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + k[:, None],
            mask=mask_n[None, :] & (k < K)[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N] fp8
        acc += tl.dot(a, b, out_dtype=tl.float32)
    a_scale = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
    b_scale = tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    c = c_ptr + split * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def channel_gemm_triton(
    q: Tensor, q_scale: Tensor, weight: Tensor, weight_scale: Tensor, out_dtype: torch.dtype, config=None
) -> Tensor:
    """y [m, n] = (q * q_scale) (weight * weight_scale[:, None])^T with fp32 accumulation. `config`:
    tile sizes, warps, stages and `split_k` (default: by m, split-K from `fill_split`)."""
    m, k = q.shape
    n = weight.shape[0]
    if config is None:
        if m <= 16:
            config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
        elif m <= 64:
            config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
        else:
            config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
        tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
        config["split_k"] = fill_split(
            tiles, triton.cdiv(k, config["BLOCK_K"]), sm_count(q.device, cpu_default=4)
        )
    config = dict(config)
    split, per_split = split_tiles(triton.cdiv(k, config["BLOCK_K"]), int(config.pop("split_k", 1)))
    out = _split_output(split, m, n, out_dtype, q.device)
    if m == 0:
        return _sum_splits(out, out_dtype)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), split)
    _channel_gemm_kernel[grid](
        q,
        q_scale,
        weight,
        weight_scale,
        out,
        m,
        n,
        k,
        q.stride(0),
        weight.stride(0),
        out.stride(0) if split > 1 else 0,
        n,
        per_split,
        **config,
    )
    return _sum_splits(out, out_dtype)


def scaled_mm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether torch._scaled_mm's row-wise scaling serves this GEMM: CUDA sm_89+, bf16 output, K and N
    multiples of 16."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0


def w8a8_channel_matmul(
    x: Tensor, weight: Tensor, weight_scale: Tensor, use_scaled_mm: bool | None = None
) -> Tensor:
    """y [m, n] = x [m, k] W^T, W = weight [n, k] (e4m3) * weight_scale [n] (fp32); x quantized per
    token. `use_scaled_mm`: None picks torch._scaled_mm above CHANNEL_TRITON_MAX_M rows where it
    applies, else the Triton kernel."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x [m, k] and weight [n, k] expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    q, q_scale = per_token_quant(x)
    if use_scaled_mm is None:
        use_scaled_mm = x.shape[0] > CHANNEL_TRITON_MAX_M and scaled_mm_applies(x, weight)
    if use_scaled_mm:
        return torch._scaled_mm(
            q,
            weight.t(),  # [k, n], column-major as cuBLASLt wants the second operand
            scale_a=q_scale,  # [m, 1]
            scale_b=weight_scale.view(1, -1),  # [1, n]
            out_dtype=x.dtype,
        )
    return channel_gemm_triton(q, q_scale, weight, weight_scale, x.dtype)
