"""The split-K skinny GEMM (small decode batches) against torch's matmul in float32.

On a CPU it runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported); with CUDA the same tests run directly, in bf16 too, plus the linear layers' use of it. The
variant whose reduction also adds the residual and applies RMSNorm is checked against the two steps, and
the gated variant (x a SwiGLU gate/up output, the activation applied as it loads) against the activation
then the product.
"""

import os
import re

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    ON_GPU,
    compile_for_sm90,
    direct,
    interpreter_test,
    run_file_under_interpreter,
)

# bf16 dots are wrong under the numpy-backed interpreter: bf16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@interpreter_test
def test_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 46, exact=True)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 70, 300), (3, 64, 512), (16, 33, 129)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_matches_matmul(dtype, m, n, k, splits) -> None:
    from nanovllm.kernels.skinny_gemm import skinny_gemm

    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    ref = x.float() @ w.float().T
    out = skinny_gemm(x, w, num_splits=splits)
    assert out.dtype == dtype and out.shape == (m, n)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype] * scale, rtol=0)
    out_b = skinny_gemm(x, w, b, num_splits=splits)
    torch.testing.assert_close(out_b.float(), ref + b.float(), atol=TOL[dtype] * scale, rtol=0)


@direct
def test_split_results_are_the_same_every_run() -> None:
    from nanovllm.kernels.skinny_gemm import skinny_gemm

    x = torch.randn(4, 1000, device=DEVICE)
    w = torch.randn(50, 1000, device=DEVICE)
    first = skinny_gemm(x, w, num_splits=4)
    assert torch.equal(first, skinny_gemm(x, w, num_splits=4))


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 64, 300, False), (3, 100, 512, True), (8, 128, 129, True)])
@pytest.mark.parametrize("splits", [None, 1])
def test_add_rms_norm_equals_the_two_steps(dtype, m, n, k, bias, splits) -> None:
    from nanovllm.kernels.skinny_gemm import skinny_gemm, skinny_gemm_add_rms_norm
    from nanovllm.layers.layernorm import add_rms_norm

    gen = torch.Generator().manual_seed(m * 100 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    residual = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    norm_weight = (torch.rand(n, generator=gen) + 0.5).to(dtype).to(DEVICE)
    # The same products and split order as the fused call, then RMSNorm's own ops.
    y = skinny_gemm(x, w, b, num_splits=splits)
    ref_out, ref_residual = add_rms_norm.fn(y, residual, norm_weight, 1e-6)
    out, new_residual = skinny_gemm_add_rms_norm(x, w, b, residual, norm_weight, 1e-6, num_splits=splits)
    assert out.dtype == new_residual.dtype == dtype and out.shape == new_residual.shape == (m, n)
    torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=0)  # the same roundings
    # The norm's sum of squares is taken in another order: a unit or two in the dtype's last place.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol * 4, rtol=tol)


@direct
def test_add_rms_norm_bad_inputs_are_value_errors() -> None:
    from nanovllm.kernels.skinny_gemm import skinny_gemm_add_rms_norm

    x, w = torch.zeros(2, 16, device=DEVICE), torch.zeros(8, 16, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        skinny_gemm_add_rms_norm(x, w, None, torch.zeros(2, 7, device=DEVICE), ones, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        skinny_gemm_add_rms_norm(x, w, None, torch.zeros(2, 8, device=DEVICE).half(), ones, 1e-6)
    with pytest.raises(ValueError, match="norm_weight"):
        skinny_gemm_add_rms_norm(x, w, None, torch.zeros(2, 8, device=DEVICE), ones[:4], 1e-6)
    with pytest.raises(ValueError, match="multiply"):
        skinny_gemm_add_rms_norm(x[:, :15], w, None, torch.zeros(2, 8, device=DEVICE), ones, 1e-6)


@direct
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize(
    "m,n,k,bias,splits,gated", [(1, 64, 300, False, 3, False), (5, 40, 512, True, None, True)]
)
def test_one_launch_add_rms_norm_is_the_two_launches_bit_for_bit(dtype, m, n, k, bias, splits, gated) -> None:
    """With a counter the last program reduces, adds and normalises: the same bits as the second launch,
    and the counter is zero again after each call (so it serves the next one)."""
    from nanovllm.kernels.skinny_gemm import skinny_gemm_add_rms_norm

    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k * (2 if gated else 1), generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    residual = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    norm_weight = (torch.rand(n, generator=gen) + 0.5).to(dtype).to(DEVICE)
    args = (x, w, b, residual, norm_weight, 1e-6, splits, gated)
    ref_out, ref_residual = skinny_gemm_add_rms_norm(*args)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        out, new_residual = skinny_gemm_add_rms_norm(*args, counter=counter)
        assert torch.equal(out, ref_out) and torch.equal(new_residual, ref_residual)
        assert counter.item() == 0
    with pytest.raises(ValueError, match="counter"):
        skinny_gemm_add_rms_norm(*args, counter=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="counter"):
        skinny_gemm_add_rms_norm(*args, counter=torch.zeros(2, dtype=torch.int32, device=DEVICE))


def _gated_case(dtype, m, n, k, seed):
    """A gate/up output [m, 2k], its activation silu(gate) * up computed in float32 and rounded once (as
    the compiled silu_and_mul), and a weight [n, k]."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 2).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    return gate_up.to(DEVICE), act.to(DEVICE), w.to(DEVICE)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 64, 300), (5, 40, 512)])
@pytest.mark.parametrize("splits", [1, 3])
def test_gated_equals_the_activation_then_the_product(dtype, m, n, k, splits) -> None:
    from nanovllm.kernels.skinny_gemm import skinny_gemm, skinny_gemm_add_rms_norm

    gate_up, act, w = _gated_case(dtype, m, n, k, seed=m * 7 + k)
    ref = skinny_gemm(act, w, num_splits=splits)
    out = skinny_gemm(gate_up, w, num_splits=splits, gated=True)
    assert out.shape == (m, n) and out.dtype == dtype
    # The kernel's sigmoid and torch's may round an activation differently by a unit in the last place.
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * scale, rtol=0)
    # ... and it is an activation of the right halves: swapped halves give another product.
    swapped = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
    wrong = skinny_gemm(swapped, w, num_splits=splits, gated=True)
    assert (wrong.float() - ref.float()).abs().max() > 10 * TOL[dtype] * scale
    residual = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    norm_weight = torch.linspace(0.5, 1.5, n).to(dtype).to(DEVICE)
    ref_out, ref_res = skinny_gemm_add_rms_norm(act, w, None, residual, norm_weight, 1e-6, num_splits=splits)
    out, res = skinny_gemm_add_rms_norm(gate_up, w, None, residual, norm_weight, 1e-6, splits, gated=True)
    torch.testing.assert_close(res.float(), ref_res.float(), atol=TOL[dtype] * (scale + 4), rtol=0)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype] * 8, rtol=TOL[dtype])


def _compile_skinny_for_sm90(gated: bool = False, fuse_norm: bool = False) -> dict:
    """The skinny kernel compiled for an H200 as the engine launches it (bf16, 4 splits)."""
    from nanovllm.kernels import skinny_gemm as S

    pointers = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32")
    scalars = ["M", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om"]
    constants = dict(ROWS=16, BLOCK_N=S.BLOCK_N, BLOCK_K=S.BLOCK_K, SPLIT=4, HAS_BIAS=False)
    constants.update(DOT_PRECISION="tf32", TO_PARTS=True, GATED=gated, FUSE_NORM=fuse_norm, NORM_BLOCK=1024)
    norm_pointers = dict(residual_ptr="*bf16", norm_weight_ptr="*bf16", norm_out_ptr="*bf16")
    norm_pointers.update(residual_out_ptr="*bf16", counter_ptr="*i32")
    if fuse_norm:
        pointers.update(norm_pointers)
        scalars.append("stride_rm")
    else:
        constants.update(dict.fromkeys([*norm_pointers, "stride_rm"]))
    signature = {**pointers, **{name: "i32" for name in scalars}, "eps": "fp32"}
    aligned = [*pointers, "K", "k_per_split", "stride_xm", "stride_wn", "stride_om"]
    return compile_for_sm90(S._skinny_kernel, signature, constants, aligned, S.NUM_WARPS, S.NUM_STAGES)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run in the parent")
def test_gated_kernel_compiles_for_sm90() -> None:
    """Compiled for an H200 (no GPU needed): the gated loads lower, with the sigmoid's exponentials in the
    loop, and the plain kernel has none."""
    exps = [_compile_skinny_for_sm90(gated)["ptx"].count("ex2.approx") for gated in (False, True)]
    assert exps[0] == 0 and exps[1] > 0, exps


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for sm_90; run in the parent")
def test_one_launch_norm_compiles_for_sm90_with_an_ordered_count() -> None:
    """The interpreter runs programs one after another, so only the compiled kernel shows the ordering
    that makes the last program's reads safe: an acquire-release count at GPU scope after a barrier, and
    partials read past L1. The plain kernel counts nothing."""
    plain, fused = _compile_skinny_for_sm90()["ptx"], _compile_skinny_for_sm90(fuse_norm=True)["ptx"]
    assert "atom" not in plain and "ld.global.cg" not in plain
    assert re.search(r"atom\.global\.gpu\.acq_rel\.add|atom\.acq_rel\.gpu\.global\.add", fused), [
        line for line in fused.splitlines() if "atom" in line
    ]
    assert "ld.global.cg" in fused and "bar.sync" in fused


@direct
def test_bad_inputs_are_value_errors() -> None:
    from nanovllm.kernels.skinny_gemm import MAX_ROWS, skinny_gemm

    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiply"):
        skinny_gemm(torch.zeros(2, 15, device=DEVICE), w)
    with pytest.raises(ValueError, match="at most"):
        skinny_gemm(torch.zeros(MAX_ROWS + 1, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        skinny_gemm(torch.zeros(2, 16, device=DEVICE, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="bias"):
        skinny_gemm(torch.zeros(2, 16, device=DEVICE), w, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="gate/up halves"):
        skinny_gemm(torch.zeros(2, 16, device=DEVICE), w, gated=True)  # needs [2, 32]


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="the engine takes this path on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_layers_take_it_where_it_wins(dtype) -> None:
    """UnquantizedLinearMethod routes few rows through K >= N weights here, and everything else to
    F.linear; both give F.linear's result (within the dtype's rounding), for 2-D and 3-D inputs."""
    from torch import nn

    from nanovllm.kernels.skinny_gemm import ENGINE_MAX_ROWS, prefers_skinny
    from nanovllm.quantization.base_config import UnquantizedLinearMethod

    method = UnquantizedLinearMethod()
    gen = torch.Generator().manual_seed(3)
    for n, k, rows, expected in [
        (1024, 2048, 1, True),  # o_proj shapes
        (1024, 3072, ENGINE_MAX_ROWS, True),  # down_proj
        (1024, 3072, ENGINE_MAX_ROWS + 1, False),
        (4096, 1024, 1, False),  # qkv: cuBLAS is faster
        (128, 2048, 1, False),  # a MoE router gate: not measured, left to cuBLAS
    ]:
        layer = nn.Module()
        layer.weight = nn.Parameter(torch.randn(n, k, generator=gen).to(dtype).cuda(), requires_grad=False)
        bias = torch.randn(n, generator=gen).to(dtype).cuda()
        x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
        assert prefers_skinny(x, layer.weight) == expected, (n, k, rows)
        assert not prefers_skinny(x.float(), layer.weight.float())
        ref = torch.nn.functional.linear(x.float(), layer.weight.float(), bias.float())
        scale = ref.abs().max().item()
        for inp in (x, x.view(1, rows, k)):
            out = method.apply(layer, inp, bias)
            assert out.shape == (*inp.shape[:-1], n) and out.dtype == dtype
            torch.testing.assert_close(out.reshape(rows, n).float(), ref, atol=TOL[dtype] * scale, rtol=0)


def test_cpu_inputs_stay_on_torch() -> None:
    from nanovllm.kernels.skinny_gemm import prefers_skinny

    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    assert not prefers_skinny(x, w)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="the engine takes this path on CUDA only")
def test_row_parallel_layer_fuses_add_norm_where_skinny_runs() -> None:
    """RowParallelLinear.forward_add_rms_norm equals RMSNorm after the layer, fused (o_proj shapes, one
    row) or not (more rows than the skinny path takes; float32)."""
    from nanovllm.kernels.skinny_gemm import ENGINE_MAX_ROWS
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.linear import RowParallelLinear

    torch.manual_seed(5)
    for dtype, rows in [(torch.bfloat16, 1), (torch.bfloat16, ENGINE_MAX_ROWS + 3), (torch.float32, 2)]:
        with torch.device("cuda"):
            layer = RowParallelLinear(2048, 1024).to(dtype)
            norm = RMSNorm(1024).to(dtype)
        layer.weight.data.normal_(0, 2048**-0.5)
        norm.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(rows, 2048, device="cuda", dtype=dtype)
        residual = torch.randn(rows, 1024, device="cuda", dtype=dtype)
        ref_out, ref_residual = norm(layer(x), residual)
        out, new_residual = layer.forward_add_rms_norm(x, residual, norm)
        torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=0)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=6e-2, rtol=1.6e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="the engine takes this path on CUDA only")
@pytest.mark.parametrize("fuse", [False, True])
def test_qwen3_mlp_folds_the_activation_into_down_proj_when_asked(fuse, monkeypatch) -> None:
    """Qwen3MLP with a norm: with ENGINE_FUSE_SILU_MUL down_proj takes the gate/up output at one row (no
    activation launch), otherwise the activation runs first; either way the result is the unfused
    MLP's, and more rows than the skinny path takes never fuse."""
    from types import SimpleNamespace

    from nanovllm.kernels import skinny_gemm as skinny
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.models.qwen3 import Qwen3MLP

    monkeypatch.setattr(skinny, "ENGINE_FUSE_SILU_MUL", fuse)
    config = SimpleNamespace(hidden_size=1024, intermediate_size=3072, hidden_act="silu")
    torch.manual_seed(6)
    with torch.device("cuda"):
        mlp = Qwen3MLP(config).to(torch.bfloat16)
        norm = RMSNorm(1024).to(torch.bfloat16)
    for param in mlp.parameters():
        param.data.normal_(0, 0.03)
    calls = []
    mlp.act_fn.register_forward_hook(lambda *args: calls.append(1))
    for rows in (1, skinny.ENGINE_MAX_ROWS + 1):
        calls.clear()
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref_out, ref_residual = norm(mlp(x), residual)
            calls.clear()
            out, new_residual = mlp(x, norm, residual)
        assert len(calls) == (0 if fuse and rows == 1 else 1), (fuse, rows)
        torch.testing.assert_close(new_residual.float(), ref_residual.float(), atol=3e-2, rtol=1.6e-2)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=6e-2, rtol=3e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="the programs race only on a GPU")
@pytest.mark.parametrize("rows,n,k", [(1, 1024, 2048), (8, 1024, 3072), (1, 4096, 12288)])
def test_one_launch_norm_in_a_cuda_graph_is_the_two_launches_every_replay(rows, n, k) -> None:
    """Qwen3-0.6B's o_proj and down_proj and the 8B's down_proj shapes: hundreds of programs race to
    count themselves done, and each of many replays with new inputs gives the second launch's bits."""
    from nanovllm.kernels.skinny_gemm import skinny_gemm_add_rms_norm

    torch.manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    skinny_gemm_add_rms_norm(x, w, None, residual, norm_weight, 1e-6, counter=counter)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_residual = skinny_gemm_add_rms_norm(x, w, None, residual, norm_weight, 1e-6, counter=counter)
    for step in range(20):
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        ref_out, ref_residual = skinny_gemm_add_rms_norm(x, w, None, residual, norm_weight, 1e-6)
        assert torch.equal(out, ref_out) and torch.equal(new_residual, ref_residual), step
    assert counter.item() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="the engine takes this path on CUDA only")
def test_row_parallel_layer_finishes_the_norm_in_one_launch_when_asked(monkeypatch) -> None:
    """With ENGINE_ONE_LAUNCH_ADD_NORM the layer's counter is used and no second launch runs; the result
    is the two launches' bits."""
    from nanovllm.kernels import skinny_gemm as skinny
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.linear import RowParallelLinear

    torch.manual_seed(7)
    with torch.device("cuda"):
        layer = RowParallelLinear(2048, 1024).to(torch.bfloat16)
        norm = RMSNorm(1024).to(torch.bfloat16)
    layer.weight.data.normal_(0, 2048**-0.5)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    ref = layer.forward_add_rms_norm(x, residual, norm)
    launches = []
    second = skinny._reduce_add_rms_norm_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return second[grid]

    monkeypatch.setattr(skinny, "_reduce_add_rms_norm_kernel", Counted())
    monkeypatch.setattr(skinny, "ENGINE_ONE_LAUNCH_ADD_NORM", True)
    out = layer.forward_add_rms_norm(x, residual, norm)
    assert launches == [] and layer.skinny_counter.item() == 0
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    monkeypatch.setattr(skinny, "ENGINE_ONE_LAUNCH_ADD_NORM", False)
    layer.forward_add_rms_norm(x, residual, norm)
    assert len(launches) == 1
