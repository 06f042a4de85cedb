"""The Triton W4A16 GEMM against dequantize-then-matmul (plain PyTorch, fp32).

Without CUDA the kernel tests re-run this file in a subprocess under TRITON_INTERPRET=1 at small sizes
(as tests/kernels/test_triton_kernels.py does); on a GPU they run directly, with realistic shapes and a
CUDA-graph capture too.
"""

import pytest
import torch

from nanovllm.quantization.int4_utils import dequantize_int4, pack_int4
from tests.kernels.interpreter import (
    DEVICE,
    INTERPRET,
    ON_GPU,
    compile_for_sm90,
    direct,
    interpreter_test,
    run_file_under_interpreter,
)

# bf16 dots are wrong under the numpy-backed interpreter, so it checks fp16 and fp32; the GPU bf16 too.
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]
# Relative to the output's largest magnitude: the kernel rounds the dequantized weights to x's dtype
# (or not at all), as the reference does, and sums in a different order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@interpreter_test
def test_w4a16_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 56, timeout=600)


def make_weights(k: int, n: int, group_size: int, act_order: bool, seed: int = 0):
    """Random 4-bit weights in the internal layout: (qweight, qzeros, scales, g_idx or None)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = None
    if act_order:
        order = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return pack_int4(q, 0), pack_int4(zeros, 1), scales, g_idx


def reference(x, qweight, qzeros, scales, zero_offset, g_idx, bias):
    """fp32 matmul with the weights dequantized and rounded to x's dtype (what the engine's CPU path and
    an unquantized model holding the dequantized weights compute)."""
    w = dequantize_int4(
        qweight.cpu(), qzeros.cpu(), scales.cpu(), zero_offset, None if g_idx is None else g_idx.cpu()
    )
    y = x.cpu().float() @ w.to(x.dtype).float().t()
    if bias is not None:
        y += bias.cpu().float()
    return y


def check(m, k, n, group_size, dtype, act_order=False, zero_offset=1, bias=False, config=None, seed=0):
    from nanovllm.kernels.w4a16 import w4a16_matmul

    qweight, qzeros, scales, g_idx = make_weights(k, n, group_size, act_order, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    want = reference(x, qweight, qzeros, scales, zero_offset, g_idx, b)
    dx, dq, dz, ds, dg, db = (
        t.to(DEVICE) if t is not None else None for t in (x, qweight, qzeros, scales, g_idx, b)
    )
    got = w4a16_matmul(dx, dq, dz, ds, group_size, zero_offset, g_idx=dg, bias=db, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    err = (got.cpu().float() - want).abs().max() / want.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (m={m} k={k} n={n} group={group_size})"


SMALL = dict(k=256, n=64) if not ON_GPU else dict(k=1024, n=512)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("m", [1, 5, 70])
def test_matches_dequantized_matmul(m, group_size, dtype):
    """Decode (split-K) and prefill (tiled) launches for every group size."""
    check(m, SMALL["k"], SMALL["n"], group_size, dtype)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [2, 70])
def test_act_order_g_idx(m, dtype):
    """GPTQ act-order: each row's group read from g_idx."""
    check(m, SMALL["k"], SMALL["n"], 32, dtype, act_order=True)


@direct
@pytest.mark.parametrize("zero_offset", [0, 1])
@pytest.mark.parametrize("m", [3, 70])
def test_zero_offset_and_bias(m, zero_offset):
    """AWQ's zeros as stored (offset 0), GPTQ v1's plus one; bias added after the split-K reduction
    (m=3) or in the tile (m=70)."""
    check(m, SMALL["k"], SMALL["n"], 64, torch.float16, zero_offset=zero_offset, bias=True)


@direct
@pytest.mark.parametrize("magic", [True, False])
@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_explicit_configs(split_k, magic):
    """Uneven K splits (more splits asked than tiles), tiles wider than N, a K tile larger than the
    group (per-row scales) and than K, tiles inside one group (per channel, and groups of one tile),
    both nibble conversions. (An earlier kernel failed at these [16, 32] tiles compiled, not interpreted.)"""
    from nanovllm.kernels.w4a16 import W4A16Config

    cfg = W4A16Config(
        block_m=16, block_n=32, block_k=128, split_k=split_k, num_warps=4, num_stages=2, magic=magic
    )
    check(3, 384, 40, 64, torch.float16, config=cfg)
    check(3, 384, 40, -1, torch.float16, config=cfg, bias=True)
    check(3, 384, 40, 128, torch.float16, config=cfg, zero_offset=0)
    check(3, 384, 40, 32, torch.float16, config=cfg, act_order=True)
    wide = W4A16Config(
        block_m=16, block_n=64, block_k=256, split_k=split_k, num_warps=4, num_stages=2, magic=magic
    )
    check(2, 512, 48, 128, torch.float32, config=wide)


@direct
@pytest.mark.parametrize("block_m,swap_ab", [(1, False), (16, True), (32, True)])
def test_cuda_core_and_swapped_configs(block_m, swap_ab):
    """BLOCK_M 1 multiplies on CUDA cores, swap_ab dots the weight tile first: several row tiles
    (M > BLOCK_M), uneven splits, a K tile inside one group and one straddling groups, act-order, fp32 and
    a bias after the reduction."""
    from nanovllm.kernels.w4a16 import W4A16Config

    cfg = W4A16Config(block_m, block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2, swap_ab=swap_ab)
    check(5, 384, 40, 64, torch.float16, config=cfg, bias=True)
    check(3, 384, 40, 32, torch.float16, config=cfg, zero_offset=0)
    check(2, 384, 40, 32, torch.float16, config=cfg, act_order=True)
    check(1, 384, 48, -1, torch.float32, config=cfg)


@direct
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("split_k, prefetch", [(1, False), (3, False), (3, True)])
def test_gemv_configs(rows, split_k, prefetch):
    """The CUDA-core GEMV at 1, 2 and 4 rows a program, with and without the next tile's loads issued
    first: several row tiles and a partial one (M not a multiple of the rows), tiles wider than N, uneven
    splits (with prefetch: a split's first tile, and the reads after its last one masked off), K not a
    multiple of the tile (a per-channel group of 200 rows: 8-row tiles), both zero-point offsets, a bias
    in the tile or after the reduction, fp32 activations."""
    from nanovllm.kernels.w4a16 import W4A16Config

    cfg = W4A16Config(rows, 64, 32, split_k, 4, 1, gemv=True, prefetch=prefetch)
    check(2 * rows + 1, 384, 40, 32, torch.float16, config=cfg, bias=True)
    check(rows, 384, 48, 64, torch.float16, config=cfg, zero_offset=0)
    check(rows, 384, 40, 128, torch.float32, config=cfg)
    narrow = W4A16Config(rows, 32, 8, split_k, 4, 2 - prefetch, gemv=True, prefetch=prefetch)
    check(rows + 1, 200, 24, -1, torch.float16, config=narrow, bias=True)


@direct
@pytest.mark.parametrize("m", [1, 2, 3])
def test_decode_defaults_take_the_gemv(m):
    """Up to GEMV_MAX_M rows the default configuration is the GEMV (one group per tile), past it the
    split-K tl.dot launch; act-order weights keep the tiled kernel's per-row groups."""
    from nanovllm.kernels.w4a16 import GEMV_MAX_M, default_config

    k, n = SMALL["k"], SMALL["n"]
    cfg = default_config(m, n, k, torch.float16, torch.device(DEVICE), 32)
    assert cfg.gemv == (m <= GEMV_MAX_M)
    if cfg.gemv:
        assert cfg.block_m >= m and 32 % cfg.block_k == 0
    assert not default_config(m, n, k, torch.float16, torch.device(DEVICE), 32, act_order=True).gemv
    check(m, k, n, 32, torch.float16, zero_offset=0, bias=True)
    check(m, k, n, 32, torch.float16, act_order=True)


@direct
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_tiled_prefill_kernel(group_size):
    """Prefill rows multiply in the tiled kernel when its configuration is asked for (by default they
    dequantize and call cuBLAS, which test_matches_dequantized_matmul's m=70 checks)."""
    from nanovllm.kernels.w4a16 import default_config

    k, n = SMALL["k"], SMALL["n"]
    for dtype in (torch.float16, torch.float32):
        cfg = default_config(70, n, k, dtype, torch.device(DEVICE), group_size)
        assert cfg.block_m >= 64 and cfg.split_k == 1
        check(70, k, n, group_size, dtype, config=cfg, bias=True)
    if group_size == 32:
        check(70, k, n, 32, torch.float16, act_order=True, config=cfg)


@direct
def test_ragged_shapes():
    """N not a multiple of the tile, K not a multiple of the tile (per-channel group), M between
    tiles."""
    check(17, 200, 88, -1, torch.float16)
    check(65, 96, 24, 32, torch.float32)


@direct
def test_empty_batch():
    from nanovllm.kernels.w4a16 import w4a16_matmul

    qweight, qzeros, scales, _ = make_weights(64, 16, 32, False)
    x = torch.empty(0, 64, dtype=torch.float16, device=DEVICE)
    y = w4a16_matmul(x, qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), 32, 1)
    assert y.shape == (0, 16)


def compile_w4a16_for_sm90(x="bf16", out="bf16", **constants) -> dict:
    """`_w4a16_kernel` compiled for an H200 (see compile_for_sm90) with activations of type `x`, output
    (or fp32 partials) of type `out` and these constexprs (defaults: one group per tile, no g_idx, no
    bias, no partials, the magic conversion unpacked, BLOCK_M 16, BLOCK_N 32, BLOCK_K 128, 2 stages)."""
    from nanovllm.kernels.w4a16 import _w4a16_kernel

    signature = dict(x_ptr=f"*{x}", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", gidx_ptr="*i32")
    signature.update(bias_ptr=f"*{x}", out_ptr=f"*{out}")
    signature.update({name: "i32" for name in ("M", "N", "K", "group_size", "k_per_split", "stride_xm")})
    defaults = dict(ZERO_OFFSET=1, ROW_GROUPS=False, HAS_GIDX=False, HAS_BIAS=False, WRITE_PARTIALS=False)
    defaults.update(MAGIC=True, PACKED=False, SWAP_AB=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)
    defaults.update(DOT_PRECISION="tf32", NUM_STAGES=2)
    return compile_for_sm90(_w4a16_kernel, signature, {**defaults, **constants})


@pytest.mark.skipif(INTERPRET, reason="compiles for sm_90; run in the parent session")
@pytest.mark.parametrize("magic", [True, False])
@pytest.mark.parametrize("row_groups", [False, True])
@pytest.mark.parametrize("block_m", [16, 64])
def test_sm90_lowering_keeps_words_out_of_dot_operand_layout(block_m, row_groups, magic):
    """Compiled for an H200 (no GPU needed): no int32 tensor goes from shared memory straight into a
    dot-operand layout, and the 16-bit magic conversion lowers to byte permutes, not int-to-float
    conversions. An earlier kernel (raw nibbles dotted, zeros subtracted after) lowered the qweight
    words into a dot operand ([16, 32] tiles gave 35% errors on the H200 while the interpreter passed)."""
    asm = compile_w4a16_for_sm90(ROW_GROUPS=row_groups, HAS_BIAS=True, MAGIC=magic, BLOCK_M=block_m)
    ttgir = asm["ttgir"]
    assert "tt.dot" in ttgir or "warp_group_dot" in ttgir  # mma.sync at 16 rows, wgmma at 64
    assert not words_in_dot_operand_layout(ttgir)
    if magic and not row_groups:  # the tile becomes bf16 by or + bitcast + subtract, no cvt from s32
        assert "cvt.rn.bf16.s32" not in asm["ptx"] and "tt.bitcast" in ttgir


def words_in_dot_operand_layout(ttgir: str) -> list[str]:
    """The shared-memory loads of int32 tensors straight into a dot-operand layout."""
    loads = [line.strip() for line in ttgir.splitlines() if "ttg.local_load" in line]
    return [line for line in loads if "xi32" in line and "dot_op" in line.split("->")[-1]]


@pytest.mark.skipif(INTERPRET, reason="compiles for sm_90; run in the parent session")
def test_sm90_one_row_multiplies_on_cuda_cores():
    """BLOCK_M 1 (a single decode stream) compiles to fused multiply-adds, no tensor-core instruction,
    with the weight loads software-pipelined (a plain `range` loop without a dot is not)."""
    asm = compile_w4a16_for_sm90(
        out="fp32", ZERO_OFFSET=0, WRITE_PARTIALS=True, BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, NUM_STAGES=3
    )
    assert "tt.dot" not in asm["ttgir"] and "mma" not in asm["ptx"]
    assert "fma.rn.f32" in asm["ptx"]
    assert "async_copy_global_to_local" in asm["ttgir"]  # tl.range's stages pipeline the weight loads


@pytest.mark.skipif(INTERPRET, reason="compiles for sm_90; run in the parent session")
@pytest.mark.parametrize("dtype,fma", [("bf16", "fma.rn.bf16x2"), ("fp16", "fma.rn.f16x2")])
@pytest.mark.parametrize("swap_ab", [True, False])
def test_sm90_packed_dequantization_lowering(swap_ab, dtype, fma):
    """The packed path compiled for an H200: every word becomes its 8 values in the inline PTX (4 lop3
    and 4 packed FMAs), none of the one-value-at-a-time conversion is left, and the words stay out of
    the dot-operand layout (as above)."""
    asm = compile_w4a16_for_sm90(
        x=dtype, out="fp32", WRITE_PARTIALS=True, PACKED=True, SWAP_AB=swap_ab, BLOCK_N=64, NUM_STAGES=3
    )
    ptx, ttgir = asm["ptx"], asm["ttgir"]
    assert fma in ptx and "lop3.b32" in ptx
    # 4 packed FMAs per word, [64, 16] words over 128 threads (a pipelined loop may be peeled: multiples)
    assert ptx.count(fma) % (8 * 4) == 0, ptx.count(fma)
    assert "cvt.rn.bf16.s32" not in ptx and "tt.bitcast" not in ttgir
    assert not words_in_dot_operand_layout(ttgir)


@pytest.mark.skipif(INTERPRET, reason="compiles for sm_90; run in the parent session")
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("prefetch", [False, True])
def test_sm90_gemv_keeps_words_in_registers(rows, prefetch):
    """The GEMV compiled for an H200: nothing goes through shared memory (each thread's columns of the
    word tile are loaded, dequantized and multiplied in its registers, and the sum over the tile's rows
    stays in the thread), q - z is made without int-to-float conversions (the few left convert the zero
    points and the group index), and there are fused multiply-adds for every weight's dequantization and
    for its product with each row of x ([16 or 8, 512] words over 128 threads: 512 or 256 weights a
    thread; the first product into a zero accumulator may be a mul)."""
    from nanovllm.kernels.w4a16 import _w4a16_gemv_kernel

    signature = dict(x_ptr="*bf16", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", bias_ptr="*bf16")
    signature.update(out_ptr="*fp32")
    signature.update({name: "i32" for name in ("M", "N", "K", "group_size", "k_per_split", "stride_xm")})
    block_r = 16 if rows == 1 else 8
    constants = dict(ZERO_OFFSET=0, HAS_BIAS=False, WRITE_PARTIALS=True, EVEN_K=True, BLOCK_M=rows)
    constants.update(BLOCK_N=512, BLOCK_R=block_r, NUM_STAGES=1, PREFETCH=prefetch)
    asm = compile_for_sm90(_w4a16_gemv_kernel, signature, constants, num_stages=1)
    ptx = asm["ptx"]
    assert ".shared" not in ptx and "ttg.local_alloc" not in asm["ttgir"]
    weights = 8 * block_r * 4  # a thread's weights per iteration
    assert ptx.count("cvt.rn.f32.s32") + ptx.count("cvt.rn.f32.u32") <= 32  # against 256-512 weights
    assert ptx.count("fma.rn.f32") >= weights + rows * (weights - weights // 8)


def test_refuses_mismatched_shapes():
    from nanovllm.kernels.w4a16 import w4a16_matmul

    qweight, qzeros, scales, _ = make_weights(64, 16, 32, False)
    x = torch.zeros(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="qweight"):
        w4a16_matmul(torch.zeros(2, 72, dtype=torch.float16), qweight, qzeros, scales, 32, 1)
    with pytest.raises(ValueError, match="scales"):
        w4a16_matmul(x, qweight, qzeros, scales[:, :8].contiguous(), 32, 1)
    with pytest.raises(ValueError, match="groups"):
        w4a16_matmul(x, qweight, qzeros, scales, 16, 1)
    with pytest.raises(TypeError, match="fp16"):
        w4a16_matmul(x.to(torch.int32), qweight, qzeros, scales, 32, 1)
    from nanovllm.kernels.w4a16 import W4A16Config

    with pytest.raises(ValueError, match="block_k"):
        w4a16_matmul(x, qweight, qzeros, scales, 32, 1, config=W4A16Config(16, 32, 48, 1, 4, 2))
    with pytest.raises(ValueError, match="block_m"):
        w4a16_matmul(x, qweight, qzeros, scales, 32, 1, config=W4A16Config(4, 32, 64, 1, 4, 2))
    gemv = W4A16Config(3, 32, 16, 1, 4, 1, gemv=True)
    with pytest.raises(ValueError, match="1, 2 or 4 rows"):
        w4a16_matmul(x, qweight, qzeros, scales, 32, 1, config=gemv)
    with pytest.raises(ValueError, match="dividing the group"):
        w4a16_matmul(x, qweight, qzeros, scales, 32, 1, config=W4A16Config(1, 32, 64, 1, 4, 1, gemv=True))
    with pytest.raises(ValueError, match="prefetch"):
        w4a16_matmul(
            x, qweight, qzeros, scales, 32, 1, config=W4A16Config(16, 32, 32, 1, 4, 2, prefetch=True)
        )
    _, _, _, g_idx = make_weights(64, 16, 32, True)
    with pytest.raises(ValueError, match="g_idx"):
        w4a16_matmul(
            x, qweight, qzeros, scales, 32, 1, g_idx=g_idx, config=W4A16Config(1, 32, 16, 1, 4, 1, gemv=True)
        )


# ---------------------------------------------------------------------------------------------------------
# GPU only: realistic shapes, CUDA graphs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("k,n", [(4096, 12288), (12288, 4096), (4096, 6144)])
@pytest.mark.parametrize("m", [1, 16, 256, 1024])
def test_8b_shapes_gpu(m, k, n):
    check(m, k, n, 128, torch.bfloat16)
    check(m, k, n, 128, torch.float16, act_order=m in (1, 1024))


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n,block_k,swap_ab", [(64, 128, True), (128, 64, True), (64, 256, False)])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_packed_dequantization_gpu(m, block_n, block_k, swap_ab, dtype):
    """The inline-PTX dequantization (only on a GPU) at several tiles, one K split and three, with zero
    points stored plain and minus one."""
    from nanovllm.kernels.w4a16 import W4A16Config

    block_m = max(16, 1 << (m - 1).bit_length())
    for split, zero_offset in ((1, 0), (3, 1)):
        cfg = W4A16Config(block_m, block_n, block_k, split, 4, 3, swap_ab=swap_ab, packed=True)
        check(m, 2560, 640, 256, dtype, zero_offset=zero_offset, config=cfg, seed=split)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_capture():
    """Split-K decode launches replay in a CUDA graph with new inputs (no host syncs inside)."""
    from nanovllm.kernels.w4a16 import w4a16_matmul

    qweight, qzeros, scales, _ = make_weights(4096, 1024, 128, False)
    qweight, qzeros, scales = qweight.cuda(), qzeros.cuda(), scales.cuda()
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w4a16_matmul(x, qweight, qzeros, scales, 128, 1, bias=bias)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_matmul(x, qweight, qzeros, scales, 128, 1, bias=bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = reference(x, qweight, qzeros, scales, 1, None, bias)
    assert (y.cpu().float() - want).abs().max() / want.abs().max() < TOLERANCE[torch.bfloat16]
