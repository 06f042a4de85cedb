"""Triton split-K GEMM for a few rows: y = x W^T (+ b) when x has at most MAX_ROWS rows (small decode
batches), where the matmul is bound by reading W once.

cuBLAS reads the weights of a 0.6B-shaped layer at about 1 TB/s at batch 1 on an H200 (a 12.6 MB gate/up
projection in 12.5 us): its tiles are made for larger products, and a few dozen tiles cannot keep 132 SMs
streaming. Here each program owns BLOCK_N output features and one of SPLIT_K slices of the input features,
so a layer runs a few hundred programs, each streaming its own [BLOCK_N, BLOCK_K] weight tiles through a
software pipeline while the tiny x tile stays in registers. With SPLIT_K > 1 the programs write float32
partials and a second kernel sums them in a fixed order (adds the bias, rounds once): no atomics, so the
result is the same on every run. The launch grid depends on shapes only (CUDA-graph safe).

`skinny_gemm_add_rms_norm` gives that second kernel the next step of a decoder layer too: the residual
add and the RMSNorm that follow o_proj and down_proj, one program per row (the hidden size fits one
tile). At batch 1 the add + norm was a launch of its own after each of the two products. Given a
`counter`, the products' own launch does that second kernel's work too: each program counts itself done,
and the last one reduces every row (see ENGINE_ONE_LAUNCH_ADD_NORM for what it measured).

`gated=True` reads x as a SwiGLU block's gate/up projection output [M, 2K] and multiplies silu(gate) * up
[M, K] instead, computed per K tile as the products load it (the MLP's activation launch, folded into
down_proj's loads: each split reads only its own slice of both halves, so nothing is computed twice).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.kernels.device import sm_count

MAX_ROWS = 16  # x rows this path takes (tl.dot pads to 16 anyway)
BLOCK_N = 32  # output features per program
BLOCK_K = 128  # input features per loop iteration
NUM_WARPS = 4
NUM_STAGES = 4
PROGRAMS_PER_SM = 3  # split-K is chosen so a launch makes about this many programs per SM
MIN_K_PER_SPLIT = 256  # ... but leaves each split at least this many input features
REDUCE_BLOCK = 256
# Where the engine takes this path instead of cuBLAS (see `prefers_skinny`): measured on an H200 with
# benchmarks/bench_gemm.py, it wins for inputs at least as wide as the output (o_proj, down_proj: 2.3x at
# one row for Qwen3-0.6B's o_proj, 1.1x at 8 rows) and loses on the wide-output qkv and gate/up.
ENGINE_MAX_ROWS = 8
ENGINE_MIN_OUTPUTS = 1024  # the narrowest layer measured (router gates, N = experts, were not)
# Whether the engine's dense MLP hands down_proj the gate/up output (`gated`) where this path takes the
# product, instead of launching the activation first. It saves one launch a layer at batch 1-8 (about
# 1.1 us each in the batch-1 profile) but measured slower on an H200 (results/2026-12-03d: single stream
# 1.292 and 1.305 ms/token on, 1.149 and 1.153 off), so it stays off (gpu_check.sh skinny-ab
# SKINNY_FLAG=ENGINE_FUSE_SILU_MUL re-times it).
ENGINE_FUSE_SILU_MUL = False
# Whether the engine's o_proj / down_proj at batch 1-8 finish the residual add + RMSNorm in the products'
# own launch (skinny_gemm_add_rms_norm's `counter`: the last program to finish reduces) instead of a
# second launch, which took 2.9 us twice a layer in the batch-1 profile (results/2026-12-03d). Measured
# on an H200 it gains nothing: single stream 1.158 and 1.140 ms/token on, 1.149 and 1.136 off (same
# call, alternating). The last program's serial reduction costs about what the launch did. Off; Qwen3-8B
# shapes (more partials a row) were not timed (gpu_check.sh skinny-ab).
ENGINE_ONE_LAUNCH_ADD_NORM = False


def _num_splits(device: torch.device, n: int, k: int) -> int:
    sms = sm_count(device, cpu_default=8)
    n_blocks = triton.cdiv(n, BLOCK_N)
    wanted = max(1, (PROGRAMS_PER_SM * sms) // n_blocks)
    return max(1, min(wanted, k // MIN_K_PER_SPLIT, 32))


@triton.jit
def _skinny_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TO_PARTS: tl.constexpr,  # write float32 partials for a second kernel (always when SPLIT > 1)
    GATED: tl.constexpr,  # x is [M, 2K] (gate, up): multiply silu(gate) * up
    # The one-launch add + RMSNorm (`counter` of skinny_gemm_add_rms_norm): the program that finishes
    # last reduces the partials of every row as _reduce_add_rms_norm_kernel would.
    residual_ptr=None,
    norm_weight_ptr=None,
    norm_out_ptr=None,
    residual_out_ptr=None,
    counter_ptr=None,
    stride_rm=0,
    eps=0.0,
    FUSE_NORM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_idx = k0 + ks
        k_mask = k_idx < k_end
        x_mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + k_idx[None, :], mask=x_mask, other=0.0)
        if GATED:  # in float32, rounded once, as the compiled silu_and_mul (layers/activation.py)
            gate = x.to(tl.float32)
            up = tl.load(x_rows + K + k_idx[None, :], mask=x_mask, other=0.0).to(tl.float32)
            x = (gate * tl.sigmoid(gate) * up).to(w_ptr.dtype.element_ty)
        w = tl.load(w_rows + k_idx[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    if not TO_PARTS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # partials are [SPLIT, M, N] float32
        part = part_ptr + (split * M + rows[:, None]).to(tl.int64) * N + cols[None, :]
        tl.store(part, acc, mask=mask)
    if FUSE_NORM:
        # Every thread's partials are stored before one of them counts this program done; the count is
        # acquire-release at GPU scope, so the program that reads the last count sees every partial.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.debug_barrier()
            for row in range(M):
                _add_rms_norm_row(
                    part_ptr, bias_ptr, residual_ptr, norm_weight_ptr, norm_out_ptr, residual_out_ptr,
                    row, M, N, stride_rm, eps, SPLIT, HAS_BIAS, NORM_BLOCK, ".cg",
                )
            tl.atomic_xchg(counter_ptr, 0)  # zero again for the next launch (and the next graph replay)


@triton.jit
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_row(
    part_ptr, bias_ptr, residual_ptr, norm_weight_ptr, out_ptr, residual_out_ptr, row, M, N, stride_rm, eps,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, CACHE: tl.constexpr,
):
    # One row: y = the partials' sum (+ bias) in the output dtype, h = y + residual (rounded, as torch's
    # add), out = weight * (h / rms(h)) rounded as RMSNorm does (layers/layernorm.py). CACHE ".cg" reads
    # the partials from L2, where other SMs' programs of the same launch wrote them.
    row = tl.cast(row, tl.int64)  # a program id, or a loop's plain int under the interpreter
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # the fixed order of _reduce_kernel
        part = part_ptr + (s * M + row) * N + cols
        acc += tl.load(part, mask=mask, other=0.0, cache_modifier=CACHE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    residual = tl.load(residual_ptr + row * stride_rm + cols, mask=mask, other=0.0)
    h = (acc.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(residual_out_ptr + row * N + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, 0) / N + eps)
    weight = tl.load(norm_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = ((hf * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype)
    tl.store(out_ptr + row * N + cols, normed, mask=mask)


@triton.jit
def _reduce_add_rms_norm_kernel(
    part_ptr,
    bias_ptr,
    residual_ptr,
    norm_weight_ptr,
    out_ptr,
    residual_out_ptr,
    M,
    N,
    stride_rm,
    eps,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _add_rms_norm_row(
        part_ptr, bias_ptr, residual_ptr, norm_weight_ptr, out_ptr, residual_out_ptr,
        tl.program_id(0), M, N, stride_rm, eps, SPLIT, HAS_BIAS, BLOCK, "",
    )


def prefers_skinny(x: Tensor, weight: Tensor) -> bool:  # x: [..., K] (or the [..., 2K] of `gated`)
    """Whether `skinny_gemm(x, weight)` is the faster product on this input: a CUDA half-precision x of at
    most ENGINE_MAX_ROWS rows and a contiguous weight [N, K] with K >= N >= ENGINE_MIN_OUTPUTS. The choice
    depends on shapes only, so a captured CUDA graph keeps it; float32 stays on torch (its matmul is the
    tests' reference)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] >= weight.shape[0] >= ENGINE_MIN_OUTPUTS
        and weight.stride(-1) == 1
        and x.numel() // max(x.shape[-1], 1) <= ENGINE_MAX_ROWS
    )


def _check_operands(x: Tensor, weight: Tensor, bias: Tensor | None, gated: bool = False) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] * (2 if gated else 1):
        what = "gate/up halves do not match" if gated else "shapes do not multiply"
        raise ValueError(f"{what}: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, weight {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _launch_products(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    num_splits: int | None,
    to_parts: bool,
    gated: bool = False,
    fused_norm: dict | None = None,
) -> tuple[Tensor, int]:
    """Launch the split-K products of x [M, K] (gated: [M, 2K]) and weight [N, K]: into `out` (bias
    added) when there is one split and not `to_parts`, else into float32 partials [split, M, N], which
    are returned with the split count. fused_norm: the tail's arguments (see _skinny_kernel), which
    make the launch finish skinny_gemm_add_rms_norm too."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m = x.shape[0]
    n, k = weight.shape
    split = num_splits if num_splits is not None else _num_splits(x.device, n, k)
    if split < 1:
        raise ValueError(f"num_splits must be >= 1, got {split}")
    # Each split gets a whole number of BLOCK_K tiles (the last one fewer).
    k_per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(k, k_per_split)
    to_parts = to_parts or split > 1
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if to_parts else out
    dot_precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _skinny_kernel[(triton.cdiv(n, BLOCK_N), split)](
        x, weight, bias if bias is not None else x, out, part,
        m, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        ROWS=16, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT=split, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision, TO_PARTS=to_parts, GATED=gated,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **(fused_norm or {}),
    )
    return part, split


def skinny_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    num_splits: int | None = None,
    gated: bool = False,
) -> Tensor:
    """x [M, K] (M <= MAX_ROWS) times weight [N, K] transposed, plus bias [N]; the result in x's dtype.

    num_splits: split-K factor (None: from the SM count and the shapes); gated: x is [M, 2K] and
    silu(x[:, :K]) * x[:, K:] is multiplied (see the module docstring)."""
    _check_operands(x, weight, bias, gated)
    m, n = x.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    part, split = _launch_products(x, weight, bias, out, num_splits, to_parts=False, gated=gated)
    if split > 1:
        _reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK))](
            part, bias if bias is not None else x, out, m, n, out.stride(0),
            SPLIT=split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )
    return out


def skinny_gemm_add_rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    norm_weight: Tensor,
    eps: float,
    num_splits: int | None = None,
    gated: bool = False,
    counter: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`RMSNorm(norm_weight, eps)(skinny_gemm(x, weight, bias), residual)`: the normalised sum and the
    sum itself (the new residual stream), each [M, N] in x's dtype. residual: [M, N] with a contiguous
    last dimension; gated: as in `skinny_gemm`.

    Without `counter`, two launches: the products, then one that reduces, adds and normalises. With
    `counter`, an int32 tensor [1] holding zero on x's device (a layer's own), one launch: each
    program counts itself done there, and the last one does the second launch's work for every row,
    in the same order (the same bits), then sets the counter back to zero. Launches that share a
    counter must not run at the same time (one stream; a CUDA graph replays them in order)."""
    _check_operands(x, weight, bias, gated)
    m, n = x.shape[0], weight.shape[0]
    if residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(-1) != 1:
        raise ValueError(
            f"residual must be {x.dtype} [{m}, {n}] with a contiguous last dimension, got "
            f"{residual.dtype} {tuple(residual.shape)}"
        )
    if norm_weight.shape != (n,):
        raise ValueError(f"norm_weight must be [{n}], got {tuple(norm_weight.shape)}")
    if counter is not None and (
        counter.shape != (1,) or counter.dtype != torch.int32 or counter.device != x.device
    ):
        raise ValueError(
            f"counter must be an int32 tensor [1] on {x.device}, got {counter.dtype} "
            f"{tuple(counter.shape)} on {counter.device}"
        )
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out)
    if m == 0 or n == 0:
        return out, residual_out
    block = triton.next_power_of_2(n)
    if counter is not None:
        fused_norm = dict(
            residual_ptr=residual, norm_weight_ptr=norm_weight, norm_out_ptr=out,
            residual_out_ptr=residual_out, counter_ptr=counter, stride_rm=residual.stride(0), eps=eps,
            FUSE_NORM=True, NORM_BLOCK=block,
        )
        _launch_products(x, weight, bias, out, num_splits, to_parts=True, gated=gated, fused_norm=fused_norm)
        return out, residual_out
    part, split = _launch_products(x, weight, bias, out, num_splits, to_parts=True, gated=gated)
    _reduce_add_rms_norm_kernel[(m,)](
        part, bias if bias is not None else x, residual, norm_weight, out, residual_out,
        m, n, residual.stride(0), eps,
        SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )
    return out, residual_out
