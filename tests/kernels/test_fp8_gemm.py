"""FP8 GEMM kernels (block-scaled with per-token-group activations; per-channel with per-token
activations) against a plain PyTorch reference: the same quantizer in fp32 (round to nearest e4m3),
dequantize, fp32 matmul.

Without CUDA, `test_fp8_kernels_under_triton_interpreter` re-runs this file with TRITON_INTERPRET=1 in a
subprocess at small shapes (partial blocks in N and K, split-K, an all-zero row). On the GPU the same
tests run at small and realistic shapes in bf16; the bound there is a relative error of 2e-2 of the
output's largest value (bf16 output rounding, and fp32 accumulation order), 1e-4 in fp32.
"""

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

FP8 = torch.float8_e4m3fn


@interpreter_test
def test_fp8_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 8, timeout=600)


def quantize_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [m, k] quantized per row and `group`-wide column group (last group partial), dequantized."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float32, device=x.device)
    for g0 in range(0, k, group):
        part = x[:, g0 : g0 + group].float()
        scale = part.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448.0
        out[:, g0 : g0 + group] = (part / scale).clamp(-448, 448).to(FP8).float() * scale
    return out


def random_block_weight(n: int, k: int, block, gen) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, generator=gen) * 2).to(FP8)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.02 + 0.001
    return w.to(DEVICE), scale.to(DEVICE)


def dequant_block(w, scale, block):
    n, k = w.shape
    full = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return w.float() * full


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (out.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item() + 1e-6, (err, ref.abs().max().item())


SMALL_BLOCK_CASES = [
    # m, n, k, block, split_k
    (1, 160, 160, (128, 128), 1),  # partial last block in N and K
    (5, 96, 200, (32, 64), 1),
    (17, 64, 256, (64, 64), 3),  # split-K with a short last split
    # Groups the fused FP8 dot cannot take as one K tile (K >= 32, a power of two, at most 256): the
    # dequantizing kernel, a K tile over several groups (or part of one). The GPU suite found the
    # first: the interpreter does not enforce the dot's minimum K.
    (3, 40, 48, (16, 16), 2),
    (4, 48, 72, (32, 16), 1),
    (6, 50, 100, (24, 40), 2),
    (2, 40, 600, (16, 512), 1),
]
GPU_BLOCK_CASES = [
    (m, n, k, (128, 128), None) for m in (1, 16, 64, 256, 2048) for n, k in ((4096, 4096), (3072, 1024))
] + [
    (m, n, k, block, None)
    for m in (1, 64, 2048)
    for n, k, block in ((1000, 1000, (16, 16)), (3072, 1024, (32, 16)))
]

# Every block shape Fp8Config accepts must launch within tl.dot's limits.
BLOCK_SHAPES = [
    (128, 128),
    (1, 1),
    (16, 16),
    (32, 16),
    (16, 32),
    (128, 8),
    (24, 40),
    (128, 96),
    (64, 512),
    (7, 3000),
]


@pytest.mark.parametrize("block", BLOCK_SHAPES)
def test_block_launch_tiles_meet_the_dot_minimums(block):
    """On sm_90 an FP8 tl.dot needs K >= 32, a 16-bit one K >= 16, and both M, N >= 16; tile sizes
    are powers of two. Checked on the launch the wrapper builds, for every accepted block shape."""
    from nanovllm.kernels.fp8_gemm import block_gemm_launch
    from nanovllm.quantization.fp8 import Fp8Config

    assert Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=list(block)).weight_block_size
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    for m in (1, 16, 17, 64, 65, 1024, 2048):
        for n, k in ((48, 40), (4096, 4096), (3072, 1000)):
            for prequantize in (None, False, True):
                launch = block_gemm_launch(m, n, k, list(block), None, prequantize, num_sms=132)
                assert pow2(launch["BLOCK_M"]) and launch["BLOCK_M"] >= 16, launch
                assert pow2(launch["BLOCK_N"]) and launch["BLOCK_N"] >= 16, launch
                assert pow2(launch["BLOCK_K"]), launch
                if launch["DEQUANT"]:  # 16-bit dot over dequantized operands, x quantized first
                    assert launch["A_FP8"] and launch["BLOCK_K"] >= 16, launch
                else:  # FP8 dot, one group per K tile
                    assert launch["BLOCK_K"] == block[1] >= 32, launch
                assert 1 <= launch["split"] and launch["split"] * launch["per_split"] >= -(
                    -k // launch["BLOCK_K"]
                )


@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (4096, 1024)])
def test_decode_launches_fill_the_gpu(n, k):
    """Qwen3-8B's and 0.6B's projections at decode batches: the default launch has at least one
    program per SM (split-K where the output tiles are fewer), unless every K tile is a split already."""
    from nanovllm.kernels.fp8_gemm import block_gemm_launch

    sms = 132
    for m in (1, 16, 64, 65, 128, 256):
        launch = block_gemm_launch(m, n, k, [128, 128], num_sms=sms)
        programs = -(-m // launch["BLOCK_M"]) * -(-n // launch["BLOCK_N"]) * launch["split"]
        assert programs >= sms or launch["per_split"] == 1, (m, launch)


def test_block_launch_refuses_tiles_below_the_dot_minimums():
    from nanovllm.kernels.fp8_gemm import block_gemm_launch

    for bad in (
        dict(BLOCK_M=8, BLOCK_N=64),
        dict(BLOCK_M=16, BLOCK_N=48),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
        dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=0),
    ):
        with pytest.raises(ValueError, match="BLOCK_|GROUP_M"):
            block_gemm_launch(4, 64, 128, [128, 128], bad | dict(num_warps=4, num_stages=2))


@direct
@pytest.mark.parametrize("m, n, k, block, split", SMALL_BLOCK_CASES + (GPU_BLOCK_CASES if ON_GPU else []))
@pytest.mark.parametrize("prequantize", [False, True])
def test_block_matmul_against_reference(m, n, k, block, split, prequantize):
    from nanovllm.kernels.fp8_gemm import block_gemm_config, w8a8_block_matmul

    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    if m > 2:
        x[1] = 0  # an all-zero row: a tiny scale, exact zeros out
    w, scale = random_block_weight(n, k, block, gen)
    config = None
    if split is not None:
        config = block_gemm_config(m, n, -(-k // block[1]), 4) | {"split_k": split}
        if not ON_GPU:
            config |= dict(BLOCK_M=16, BLOCK_N=32, num_stages=1)
    out = w8a8_block_matmul(x, w, scale, list(block), config, prequantize=prequantize)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = quantize_groups(x, block[1]) @ dequant_block(w, scale, block).t()
    _close(out, ref, dtype)
    if m > 2:
        assert out[1].abs().max().item() == 0


@direct
@pytest.mark.parametrize("group_m", [2, 3])
def test_block_matmul_grouped_launch_order(group_m):
    """GROUP_M > 1 numbers the output tiles in another order (GROUP_M row tiles down a column of tiles,
    the last group shorter when GROUP_M does not divide the row tiles): every tile is still computed
    once, exactly as in the default order, with split-K."""
    from nanovllm.kernels.fp8_gemm import w8a8_block_matmul

    gen = torch.Generator().manual_seed(group_m)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    m, n, k, block = 50, 160, 256, [128, 128]  # 4 x 5 tiles of 16 x 32
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w, scale = random_block_weight(n, k, block, gen)
    config = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1 if not ON_GPU else 3, split_k=2)
    out = w8a8_block_matmul(x, w, scale, block, config | {"GROUP_M": group_m}, prequantize=True)
    _close(out, quantize_groups(x, 128) @ dequant_block(w, scale, block).t(), dtype)
    assert torch.equal(out, w8a8_block_matmul(x, w, scale, block, config, prequantize=True))


@direct
@pytest.mark.parametrize(
    "m, k, group", [(1, 64, 64), (6, 200, 64), (3, 384, 128), (5, 100, 24), (2, 2500, 2048)]
)
def test_per_token_group_quant(m, k, group):
    from nanovllm.kernels.fp8_gemm import per_token_group_quant

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE) * 3
    q, scale = per_token_group_quant(x, group)
    assert scale.shape == (m, -(-k // group))
    deq = q.float() * scale.repeat_interleave(group, 1)[:, :k]
    torch.testing.assert_close(deq, quantize_groups(x, group), atol=1e-6, rtol=0.07)


@direct
@pytest.mark.parametrize("m, k", [(1, 64), (6, 200), (3, 2048)])
def test_per_token_quant(m, k):
    from nanovllm.kernels.fp8_gemm import per_token_quant

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(DEVICE) * 3
    q, scale = per_token_quant(x)
    want_scale = x.abs().amax(dim=1, keepdim=True) / 448.0
    torch.testing.assert_close(scale, want_scale)
    want = (x / want_scale).clamp(-448, 448).to(FP8)
    # Equal up to a rare rounding tie of the division: at most one e4m3 step apart, almost always equal.
    diff = (q.float() - want.float()).abs()
    assert (diff > 0).float().mean().item() < 0.01
    assert torch.all(diff <= want.float().abs() * 0.125 + 2**-9)


@direct
@pytest.mark.parametrize(
    "m, n, k", [(1, 48, 64), (7, 80, 200)] + ([(1, 4096, 4096), (256, 3072, 1024)] if ON_GPU else [])
)
@pytest.mark.parametrize("use_scaled_mm", [False] + ([True] if ON_GPU else []))
def test_channel_matmul_against_reference(m, n, k, use_scaled_mm):
    from nanovllm.kernels.fp8_gemm import w8a8_channel_matmul

    gen = torch.Generator().manual_seed(n + k)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 2).to(FP8).to(DEVICE)
    scale = (torch.rand(n, generator=gen) * 0.02 + 0.001).to(DEVICE)
    if use_scaled_mm and (k % 16 or n % 16):
        pytest.skip("torch._scaled_mm needs K and N multiples of 16")
    out = w8a8_channel_matmul(x, w, scale, use_scaled_mm=use_scaled_mm)
    ref = quantize_groups(x, k) @ (w.float() * scale[:, None]).t()
    _close(out, ref, dtype)


@direct
@pytest.mark.parametrize("split", [1, 3, 7])
def test_channel_matmul_split_k(split):
    """The per-channel Triton kernel's split-K (each split's partial scaled, the splits summed) against
    the reference, with a short last split (7 K tiles in 3 splits) and one tile a split."""
    from nanovllm.kernels.fp8_gemm import channel_gemm_triton, per_token_quant

    gen = torch.Generator().manual_seed(split)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    m, n, k = 5, 48, 400  # 7 K tiles of 64, the last partial
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 2).to(FP8).to(DEVICE)
    scale = (torch.rand(n, generator=gen) * 0.02 + 0.001).to(DEVICE)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1, split_k=split)
    out = channel_gemm_triton(*per_token_quant(x), w, scale, dtype, config)
    assert out.dtype == dtype and out.shape == (m, n)
    _close(out, quantize_groups(x, k) @ (w.float() * scale[:, None]).t(), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_prefill_lengths_reuse_one_compile(monkeypatch):
    """Row counts that share a launch configuration (128-row tiles, quantized first) share one compiled
    kernel, whatever their divisibility or split-K: a prefill of a new length compiles nothing once a
    long prefill (the engine's warm-up) has run."""
    from nanovllm.kernels.fp8_gemm import _block_gemm_kernel, block_gemm_launch, w8a8_block_matmul

    gen = torch.Generator().manual_seed(0)
    n, k = 4096, 4096
    w, scale = random_block_weight(n, k, (128, 128), gen)
    x = torch.randn(2048, k, generator=gen).to("cuda", torch.bfloat16)
    w8a8_block_matmul(x, w, scale, [128, 128])  # the warm-up's long prefill
    compiles = record_compiles(monkeypatch)
    rows = (198, 333, 77, 1000, 129)
    launches = [block_gemm_launch(m, n, k, [128, 128], num_sms=132) for m in rows]
    assert len({launch["per_split"] for launch in launches}) > 2  # several split-K factors among them
    for m in rows:
        out = w8a8_block_matmul(x[:m], w, scale, [128, 128])
        _close(out, quantize_groups(x[:m], 128) @ dequant_block(w, scale, (128, 128)).t(), torch.bfloat16)
    assert _block_gemm_kernel.__name__ not in compiles, compiles
