"""The fused MoE Triton kernels (assignment sort, grouped gate/up + SiLU and down GEMMs) against the plain
PyTorch path, `fused_moe_reference`, on random inputs: experts that receive no tokens, ties in the
routing scores, empty batches, every tile size the engine picks.

Without CUDA the kernels run under Triton's interpreter, which must be switched on before triton is
imported: `test_fused_moe_under_triton_interpreter` re-runs this file in a subprocess with
TRITON_INTERPRET=1 at small sizes, and the direct tests skip in the parent session (as
test_triton_kernels.py does)."""

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    ON_GPU,
    direct,
    interpreter_test,
    record_compiles,
    run_file_under_interpreter,
)

# bf16 matmuls are wrong under the numpy-backed interpreter: there fp32 and fp16 only.
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


@interpreter_test
def test_fused_moe_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 15)


def make_inputs(t, e, k, h, i, dtype, seed=0, logits=None):
    from nanovllm.layers.fused_moe import route

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    if logits is None:
        logits = torch.randn(t, e, generator=g)
    weights, ids = route(logits.to(DEVICE), k, renormalize=True)
    return (x.to(DEVICE, dtype), w13.to(DEVICE, dtype), w2.to(DEVICE, dtype), weights, ids)


def check_against_reference(x, w13, w2, weights, ids, config=None):
    from nanovllm.kernels.fused_moe import fused_experts
    from nanovllm.layers.fused_moe import fused_moe_reference

    got = fused_experts(x, w13, w2, weights, ids, config=config)
    ref = fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.shape == x.shape and got.dtype == x.dtype
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


# ---- sorting assignments by expert ---------------------------------------------------------------------


@direct
@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (7, 16, 3), (40, 4, 2), (3, 64, 8), (11, 60, 4)])
def test_align_groups_every_assignment_in_its_experts_tiles(block_m, t, e, k):
    from nanovllm.kernels.fused_moe import max_padded_assignments, moe_align_block_size

    g = torch.Generator().manual_seed(t * 100 + e)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)  # [T, k] distinct
    sorted_ids, expert_ids, total = moe_align_block_size(ids, e, block_m)
    n = t * k
    assert sorted_ids.numel() == max_padded_assignments(n, e, block_m)
    assert sorted_ids.numel() % block_m == 0 and expert_ids.numel() == sorted_ids.numel() // block_m
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    assert total.item() == padded.sum().item()
    s, labels = sorted_ids.cpu(), expert_ids.cpu()
    num_tiles = total.item() // block_m
    assert (labels[num_tiles:] == -1).all() and (s[total.item() :] == n).all()
    seen = []
    for tile in range(num_tiles):
        rows = s[tile * block_m : (tile + 1) * block_m]
        real = rows[rows < n]
        assert (rows[rows >= n] == n).all()  # padding is the sentinel
        assert len(real) > 0, "a tile with no assignment was labelled"
        assert (flat[real] == labels[tile]).all(), "a tile mixes experts"
        seen += real.tolist()
    assert sorted(seen) == list(range(n))  # every assignment exactly once
    # Experts without tokens get no tile; the others exactly ceil(count / block_m).
    for expert in range(e):
        assert (labels[:num_tiles] == expert).sum().item() == padded[expert].item() // block_m


@direct
def test_align_of_an_empty_batch():
    from nanovllm.kernels.fused_moe import moe_align_block_size

    sorted_ids, expert_ids, total = moe_align_block_size(
        torch.empty(0, 4, dtype=torch.int64, device=DEVICE), 8, 16
    )
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and total.item() == 0


# ---- the grouped GEMMs ---------------------------------------------------------------------------------


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "t,e,k,h,i",
    [
        (1, 8, 2, 32, 48),  # decode: 6 of 8 experts get nothing
        (5, 16, 3, 64, 32),  # most experts empty, odd top-k
        (33, 4, 2, 48, 80),  # every expert busy, widths not multiples of the tiles
        (2, 4, 4, 32, 32),  # top_k = E: every token to every expert
        (9, 60, 4, 32, 48),  # Qwen1.5-MoE's 60 experts: not a power of two
    ],
)
def test_fused_experts_match_the_reference(dtype, t, e, k, h, i):
    check_against_reference(*make_inputs(t, e, k, h, i, dtype))


@direct
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    ],
    ids=["m16n32", "m16n64", "m32", "m64n64", "m64n128"],
)
def test_each_engine_tile_configuration(config):
    """The 16-bit configurations of GEMM_CONFIGS, on an fp16 batch that fills several tiles."""
    from nanovllm.kernels.fused_moe import GEMM_CONFIGS

    assert config in [c for _, c in GEMM_CONFIGS]
    check_against_reference(*make_inputs(70, 4, 2, 64, 96, torch.float16, seed=3), config=config)


@direct
def test_ties_in_routing_scores():
    """Tokens whose router logits tie (equal for every expert, or for several): whatever top-k picks,
    the kernels compute those experts, with the equal weights the tie gives."""
    t, e, k = 6, 8, 3
    logits = torch.zeros(t, e)
    logits[1, [2, 5, 7]] = 1.0  # a three-way tie at the top
    logits[2, :4] = 2.0  # four tied for three places
    logits[3] = torch.arange(e) % 2  # four-way tie at 1, four at 0
    inputs = make_inputs(t, e, k, 32, 48, torch.float32, seed=1, logits=logits)
    weights = inputs[3]
    assert torch.allclose(weights[0].cpu(), torch.full((k,), 1 / k))
    check_against_reference(*inputs)


@direct
def test_empty_batch():
    from nanovllm.kernels.fused_moe import fused_experts

    x, w13, w2, weights, ids = make_inputs(0, 8, 2, 32, 48, torch.float32)
    assert fused_experts(x, w13, w2, weights, ids).shape == (0, 32)


@direct
def test_fused_moe_layer_on_the_kernels_equals_its_reference_path():
    """FusedMoE.forward (routing included) through the kernels vs the same layer's PyTorch path."""
    from nanovllm.kernels.fused_moe import fused_experts
    from nanovllm.layers.fused_moe import FusedMoE, fused_moe_reference, route

    torch.manual_seed(0)
    for renormalize in (True, False):
        layer = FusedMoE(8, 2, 32, 48, renormalize=renormalize).to(DEVICE)
        layer.w13_weight.data.normal_(0, 0.2)
        layer.w2_weight.data.normal_(0, 0.2)
        x = torch.randn(9, 32, device=DEVICE)
        logits = torch.randn(9, 8, device=DEVICE)
        weights, ids = route(logits, 2, renormalize)
        assert torch.allclose(weights.sum(-1), torch.ones(9, device=DEVICE)) == renormalize
        ref = fused_moe_reference(x, layer.w13_weight, layer.w2_weight, weights, ids)
        got = fused_experts(x, layer.w13_weight, layer.w2_weight, weights, ids)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        if ON_GPU:
            torch.testing.assert_close(layer(x, logits), ref, rtol=1e-4, atol=1e-4)


# ---- on the GPU: the engine's shapes, and CUDA-graph capture ----------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 16, 256, 2048])
def test_qwen3_30b_a3b_shape_in_bf16(t):
    from nanovllm.kernels.fused_moe import gemm_config

    inputs = make_inputs(t, 128, 8, 2048, 768, torch.bfloat16, seed=t)
    assert gemm_config(t, 8, 128, torch.bfloat16)["BLOCK_M"] in (16, 32, 64)
    check_against_reference(*inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_prefill_lengths_reuse_one_compile(monkeypatch):
    """Token counts that share a tile configuration share the compiled kernels, whatever the
    divisibility of their assignment and tile counts: once a long prefill (the engine's warm-up) has
    run, a prefill of another length compiles nothing."""
    from nanovllm.kernels import fused_moe

    # 128 experts, top-8: from 1,537 tokens the prefill tiles. 1680 tokens: a tile count divisible by 16
    # (2048's, 382, is not); the others: odd assignment counts (2048's, 16,384, is divisible).
    lengths = (1680, 1601, 1999, 3001)
    assert len({str(fused_moe.gemm_config(t, 8, 128, torch.bfloat16)) for t in (2048, *lengths)}) == 1
    warm = make_inputs(2048, 128, 8, 256, 128, torch.bfloat16, seed=0)
    fused_moe.fused_experts(*warm)
    compiles = record_compiles(monkeypatch)
    for t in lengths:
        check_against_reference(*make_inputs(t, 128, 8, 256, 128, torch.bfloat16, seed=t))
    kernels = {"_count_kernel", "_label_kernel", "_scatter_kernel", "_gate_up_kernel", "_down_kernel"}
    assert not kernels & set(compiles), compiles


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_captured_in_a_cuda_graph_with_new_routing_each_replay():
    """No host sync and no data-dependent shape: one capture serves different routings."""
    from nanovllm.kernels.fused_moe import fused_experts
    from nanovllm.layers.fused_moe import fused_moe_reference, route

    x, w13, w2, _, _ = make_inputs(16, 32, 4, 256, 128, torch.bfloat16)
    logits = torch.randn(16, 32, device=DEVICE)
    out = torch.empty_like(x)

    def step():
        weights, ids = route(logits, 4, True)
        out.copy_(fused_experts(x, w13, w2, weights, ids))

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        logits.copy_(torch.randn(16, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
        x.normal_()
        graph.replay()
        weights, ids = route(logits, 4, True)
        ref = fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
