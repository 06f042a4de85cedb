"""The token-bitmask kernel (structured outputs) against its PyTorch equivalent and xgrammar's own apply.

Bitmasks are packed here from boolean "allowed" matrices, so both paths are also checked against the
allowed sets themselves: -inf exactly where a constrained row's token is not allowed (ids past the
bitmask included), every other logit and every unconstrained row bit for bit as it was.

On a CPU the kernel runs under Triton's interpreter in a subprocess at small sizes (TRITON_INTERPRET
must be set before triton is imported); with CUDA the same tests run directly, plus full-size ones and
the engine's path from a pinned host bitmask.
"""

import pytest
import torch

from tests.kernels.interpreter import DEVICE, ON_GPU, direct, interpreter_test, run_file_under_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
# (batch, vocab, bitmask bits): vocab not a multiple of 32; a bitmask wider than the vocabulary (the
# last word's high bits unused), exactly as wide, and narrower (ids past it must be masked); more than
# one 4,096-token block per row.
SHAPES = [(5, 37, 64), (7, 100, 96), (4, 4133, 4160), (6, 4133, 4000), (3, 64, 64)]


@interpreter_test
def test_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 17, exact=True)


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[n, bits] bool -> [n, bits / 32] int32, bit b of word w for token 32 w + b (xgrammar's layout)."""
    n, bits = allowed.shape
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    words = (allowed.reshape(n, bits // 32, 32).long() * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement


def case(batch: int, vocab: int, bits: int, num_rows: int, seed: int, dtype=torch.float32):
    """Random logits, `num_rows` distinct rows in random order, and their allowed sets (about a third of
    the tokens each; one row allowing a single token, one allowing every bit)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
    rows = torch.randperm(batch, generator=gen)[:num_rows]
    allowed = torch.rand(num_rows, bits, generator=gen) < 0.35
    if num_rows > 1:
        allowed[0] = False
        allowed[0, int(torch.randint(0, min(bits, vocab), (1,), generator=gen))] = True
        allowed[1] = True
    return logits, rows, allowed


def expected(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """From the allowed sets directly: -inf where a row's token is not allowed or past the bitmask."""
    out = logits.clone()
    vocab, bits = logits.shape[1], allowed.shape[1]
    for i, row in enumerate(rows.tolist()):
        ok = torch.zeros(vocab, dtype=torch.bool)
        ok[: min(bits, vocab)] = allowed[i, :vocab]
        out[row] = out[row].masked_fill(~ok, float("-inf"))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_reference_matches_allowed_sets(shape) -> None:
    from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch

    batch, vocab, bits = shape
    for num_rows, seed in ((batch, 0), (batch // 2, 1), (1, 2)):
        logits, rows, allowed = case(batch, vocab, bits, num_rows, seed)
        want = expected(logits, rows, allowed)
        apply_token_bitmask_torch(logits, rows, pack(allowed))
        assert torch.equal(logits, want)


def test_torch_reference_matches_xgrammar() -> None:
    """xgrammar's own apply (CPU), on the constrained rows gathered and with the bitmask covering the
    vocabulary: the same -inf pattern."""
    import xgrammar as xgr

    from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch

    for (batch, vocab, bits), seed in zip([(6, 37, 64), (5, 100, 128), (4, 4133, 4160)], range(3)):
        logits, rows, allowed = case(batch, vocab, bits, batch - 1, seed)
        bitmask = pack(allowed)
        theirs = logits[rows]
        xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
        apply_token_bitmask_torch(logits, rows, bitmask)
        assert torch.equal(logits[rows], theirs)


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype) -> None:
    from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch, apply_token_bitmask_triton

    batch, vocab, bits = shape
    for num_rows, seed in ((batch, 3), (max(1, batch // 2), 4), (1, 5)):
        logits, rows, allowed = case(batch, vocab, bits, num_rows, seed, dtype)
        bitmask = pack(allowed)
        want = logits.clone()
        apply_token_bitmask_torch(want, rows, bitmask)
        assert torch.equal(want, expected(logits, rows, allowed))
        got = logits.to(DEVICE)
        apply_token_bitmask_triton(got, rows.to(DEVICE), bitmask.to(DEVICE))
        assert torch.equal(got.cpu(), want)


@direct
def test_kernel_strided_rows_int32_and_int64_indices() -> None:
    """Logits that are a wider buffer's columns (row stride > vocab), indices of either integer type;
    no rows at all leaves the logits untouched."""
    from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch, apply_token_bitmask_triton

    logits, rows, allowed = case(6, 130, 160, 4, 7)
    bitmask = pack(allowed)
    want = logits.clone()
    apply_token_bitmask_torch(want, rows, bitmask)
    for index_dtype in (torch.int32, torch.int64):
        wide = torch.full((6, 200), 7.0, device=DEVICE)
        wide[:, :130] = logits.to(DEVICE)
        apply_token_bitmask_triton(wide[:, :130], rows.to(DEVICE, index_dtype), bitmask.to(DEVICE))
        assert torch.equal(wide[:, :130].cpu(), want)
        assert torch.all(wide[:, 130:] == 7.0)  # the columns past the view are never written
    untouched = logits.to(DEVICE)
    empty = torch.empty(0, 5, dtype=torch.int32, device=DEVICE)
    apply_token_bitmask_triton(untouched, torch.empty(0, dtype=torch.int64, device=DEVICE), empty)
    assert torch.equal(untouched.cpu(), logits)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("num_rows", [1, 26, 256])
def test_full_size_from_pinned_host_bitmask(num_rows) -> None:
    """Qwen3's vocabulary at the engine's batch, bf16: a `TokenBitmask` in pinned host memory copied on
    a side stream and applied after other work queued on the current stream, equal to the PyTorch path
    and to xgrammar's apply on the gathered rows."""
    import xgrammar as xgr

    from nanovllm.kernels.token_bitmask import apply_token_bitmask_torch
    from nanovllm.structured_output.manager import TokenBitmask, apply_token_bitmask

    batch, vocab = 256, 151_936
    logits, rows, allowed = case(batch, vocab, 4748 * 32, num_rows, num_rows, torch.bfloat16)
    bitmask = pack(allowed)
    want = logits.clone()
    apply_token_bitmask_torch(want, rows, bitmask)
    host = TokenBitmask(rows.to(torch.int32).pin_memory(), bitmask.pin_memory())
    got = logits.cuda()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):  # keep the current stream busy, so that a missing wait would read a stale mask
        busy = busy @ busy / 64
    device_mask = host.to(got.device)
    apply_token_bitmask(got, device_mask)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)
    theirs = logits.cuda()[rows.cuda()]
    xgr.apply_token_bitmask_inplace(theirs, bitmask.cuda(), vocab_size=vocab)
    assert torch.equal(got[rows.cuda()], theirs)
