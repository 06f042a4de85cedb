"""Triton kernels of the fused mixture-of-experts layer: sorting token->expert assignments into
block-aligned groups, a grouped GEMM for gate/up with SiLU-and-mul fused in, and one for down.

An assignment is one (token, k) pair of the router's top-k: `T * top_k` of them, numbered
`token * top_k + k`. `moe_align_block_size` lists them grouped by expert, each expert's group padded to a
multiple of BLOCK_M with the sentinel `T * top_k`, so every BLOCK_M-row tile of the sorted list belongs to
one expert. The GEMMs then run one program per (tile, output block): the tile's rows gathered from the
input, multiplied by that expert's weight. The down GEMM scales each row by its routing weight and writes
it to its own assignment row; the caller sums the top_k rows of each token (`[T, top_k, H].sum(1)`).

No host synchronisation and no data-dependent shape anywhere: buffers and grids are sized for the worst
case of T (every expert that can receive a token padding a whole tile), and the real total is read on the
device, so a decode step can be captured in a CUDA graph. Rows are computed independently of the other
rows of their tile, so the order inside a group (set by atomics) never changes a result.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Tunables: first guesses for an H200 (bf16, Qwen3-30B-A3B: hidden 2048, expert width 768, 128 experts,
# top-8); `benchmarks/bench_moe.py --sweep` times the alternatives.
# ---------------------------------------------------------------------------------------------------------
# Assignments per program of the counting and scattering kernels.
ALIGN_BLOCK = 256
# Blocks per loop iteration of the kernel that labels each tile with its expert.
LABEL_BLOCK = 128
# (max assignments per expert on average, config): the first entry whose bound is >= the average number
# of assignments per expert (T * top_k / num_experts) is used. Decode is bound by reading the active
# experts' weights, and a tile reads its expert's whole weight: the tile height should hold an expert's
# rows in one tile (a Poisson(8) count exceeds 16 rows 0.4% of the time, a Poisson(24) exceeds 32 6%),
# and small batches want narrow output blocks for enough programs. Prefill wants large tiles (reuse).
GEMM_CONFIGS = (
    (4, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)),
    (8, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)),
    (24, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
    (96, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)),
    (None, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)
# fp32 (ieee dot, twice the bytes per element): smaller tiles and fewer stages to fit in shared memory.
GEMM_CONFIG_FP32 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gemm_config(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> dict:
    """The tile configuration for a batch of `num_tokens` tokens (a function of shapes only)."""
    if dtype == torch.float32:
        return dict(GEMM_CONFIG_FP32)
    per_expert = num_tokens * top_k / num_experts
    for bound, config in GEMM_CONFIGS:
        if bound is None or per_expert <= bound:
            return dict(config)
    raise AssertionError("GEMM_CONFIGS must end with a catch-all entry")


def max_padded_assignments(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of the sorted list: every expert that can receive an assignment (at most
    min(num_experts, num_assignments) of them) pads its group by up to block_m - 1 rows."""
    padded = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return triton.cdiv(padded, block_m) * block_m


# ---------------------------------------------------------------------------------------------------------
# Sorting assignments by expert
# ---------------------------------------------------------------------------------------------------------
# Arguments that vary with the batch's token count, kept out of Triton's specialization (on a value of 1
# and on divisibility by 16): otherwise the first prefill of each new length class compiles its own
# variants of these kernels in the step that needs them (seconds), though start-up compiled the same
# tiles. They are only compared against and looped up to.
TOKEN_COUNT_ARGS = ("num_assignments", "max_blocks")


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS[:1])
def _count_kernel(topk_ids_ptr, counts_ptr, num_assignments, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_assignments
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + expert, 1, mask=mask)


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS[1:])
def _label_kernel(
    counts_ptr,
    offsets_ptr,
    expert_ids_ptr,
    total_ptr,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    LABEL_BLOCK: tl.constexpr,
):
    """One program: each expert's padded group start, the padded total, and each tile's expert."""
    e = tl.arange(0, E_POW2)
    count = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_POW2]
    end = tl.cumsum(padded, axis=0)  # [E_POW2], inclusive
    tl.store(offsets_ptr + e, end - padded, mask=e < num_experts)
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr, total)
    for b0 in range(0, max_blocks, LABEL_BLOCK):
        b = b0 + tl.arange(0, LABEL_BLOCK)
        start = b * BLOCK_M  # [LABEL_BLOCK]
        # The tile's expert is the first whose group ends after the tile's start (empty groups end where
        # they start, so they are counted as before it).
        expert = tl.sum((end[None, :] <= start[:, None]).to(tl.int32), axis=1)  # [LABEL_BLOCK]
        expert = tl.where(start < total, expert, -1)
        tl.store(expert_ids_ptr + b, expert, mask=b < max_blocks)


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS[:1])
def _scatter_kernel(topk_ids_ptr, offsets_ptr, cursor_ptr, sorted_ptr, num_assignments, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_assignments
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0)
    slot = tl.atomic_add(cursor_ptr + expert, 1, mask=mask)
    start = tl.load(offsets_ptr + expert, mask=mask, other=0)
    tl.store(sorted_ptr + start + slot, offs, mask=mask)


def moe_align_block_size(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the assignments of `topk_ids` [T, top_k] by expert, each group padded to `block_m` rows.

    Returns `sorted_ids` int32 [max_padded] (assignment numbers, padding = T * top_k, also after the
    real total), `expert_ids` int32 [max_padded // block_m] (each tile's expert, -1 past the total) and
    `total` int32 [1] (the padded length actually used). Sizes depend on T only."""
    num_assignments = topk_ids.numel()
    max_padded = max_padded_assignments(num_assignments, num_experts, block_m)
    max_blocks = max_padded // block_m
    device = topk_ids.device
    ids = topk_ids.reshape(-1)  # [T * top_k]
    if not ids.is_contiguous():
        ids = ids.contiguous()
    scratch = torch.zeros(3 * num_experts + 1, dtype=torch.int32, device=device)
    counts, cursor = scratch[:num_experts], scratch[num_experts : 2 * num_experts]
    offsets, total = scratch[2 * num_experts : 3 * num_experts], scratch[3 * num_experts :]
    sorted_ids = torch.full((max_padded,), num_assignments, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_assignments, ALIGN_BLOCK),)
    if num_assignments:
        _count_kernel[grid](ids, counts, num_assignments, BLOCK=ALIGN_BLOCK)
    _label_kernel[(1,)](
        counts,
        offsets,
        expert_ids,
        total,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        E_POW2=triton.next_power_of_2(num_experts),
        LABEL_BLOCK=LABEL_BLOCK,
    )
    if num_assignments:
        _scatter_kernel[grid](ids, offsets, cursor, sorted_ids, num_assignments, BLOCK=ALIGN_BLOCK)
    return sorted_ids, expert_ids, total


# ---------------------------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS[:1])
def _gate_up_kernel(
    x_ptr,  # [T, K] input tokens
    w_ptr,  # [E, 2N, K]: gate rows 0..N-1, up rows N..2N-1
    out_ptr,  # [T * top_k, N]: silu(gate) * up per assignment
    sorted_ptr,
    expert_ids_ptr,
    total_ptr,
    N,
    K,
    num_assignments,
    top_k,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignment numbers
    row_mask = rows < num_assignments
    tokens = (rows // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, [BLOCK_M, BLOCK_N] in fp32
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=TOKEN_COUNT_ARGS[:1])
def _down_kernel(
    a_ptr,  # [T * top_k, K] activations per assignment
    w_ptr,  # [E, N, K]
    out_ptr,  # [T * top_k, N]: routing weight * (a @ w[e]^T) per assignment
    weights_ptr,  # [T * top_k] fp32 routing weights
    sorted_ptr,
    expert_ids_ptr,
    total_ptr,
    N,
    K,
    num_assignments,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_mask = rows < num_assignments
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    weight = tl.load(weights_ptr + rows64, mask=row_mask, other=0.0)  # [BLOCK_M]
    acc = acc * weight[:, None]
    o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _check_inputs(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> None:
    assert x.dim() == 2 and w13.dim() == 3 and w2.dim() == 3, "x [T, H], w13 [E, 2I, H], w2 [E, H, I]"
    assert x.dtype in _SUPPORTED_DTYPES and w13.dtype == x.dtype and w2.dtype == x.dtype
    num_experts, two_i, hidden = w13.shape
    assert hidden == x.shape[1] and two_i % 2 == 0 and w2.shape == (num_experts, hidden, two_i // 2)
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0]
    assert w13.stride(2) == 1 and w2.stride(2) == 1 and x.stride(1) == 1, "rows must be contiguous"


def fused_experts(
    x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, config: dict | None = None
) -> Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k].

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights [T, top_k] (any float
    dtype, used in fp32); topk_ids [T, top_k] integer in [0, E). Returns [T, H] in x's dtype. `config`
    overrides the tile choice of `gemm_config` (for benchmarks)."""
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_assignments = num_tokens * top_k
    cfg = config or gemm_config(num_tokens, top_k, num_experts, x.dtype)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, num_experts, block_m)
    max_blocks = expert_ids.numel()
    act = torch.empty(num_assignments, inter, dtype=x.dtype, device=x.device)  # [T * top_k, I]
    out = torch.empty(num_assignments, hidden, dtype=x.dtype, device=x.device)  # [T * top_k, H]
    weights = topk_weights.reshape(-1).to(torch.float32)  # [T * top_k]
    if max_blocks:
        _gate_up_kernel[(max_blocks, triton.cdiv(inter, block_n))](
            x,
            w13,
            act,
            sorted_ids,
            expert_ids,
            total,
            inter,
            hidden,
            num_assignments,
            top_k,
            x.stride(0),
            w13.stride(0),
            w13.stride(1),
            act.stride(0),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            DOT_PRECISION=precision,
            **launch,
        )
        _down_kernel[(max_blocks, triton.cdiv(hidden, block_n))](
            act,
            w2,
            out,
            weights,
            sorted_ids,
            expert_ids,
            total,
            hidden,
            inter,
            num_assignments,
            act.stride(0),
            w2.stride(0),
            w2.stride(1),
            out.stride(0),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            DOT_PRECISION=precision,
            **launch,
        )
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H]
