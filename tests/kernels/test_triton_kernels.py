"""Triton kernels (KV store, paged prefill and decode attention) against a plain PyTorch fp32 reference.

With CUDA the tests run directly on the GPU at full sizes (marked `cuda`). Without CUDA, Triton's
interpreter must be switched on before triton is imported, which other tests of the same session may
already have done; so `test_kernels_under_triton_interpreter` re-runs this file in a subprocess with
TRITON_INTERPRET=1 and tiny shapes, and the direct tests skip in the parent session.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    INTERPRET,
    ON_GPU,
    compile_for_sm90,
    direct,
    interpreter_test,
    run_file_under_interpreter,
)

# bf16 matmuls are wrong under the numpy-backed interpreter (loads and copies are fine), so the
# interpreter checks attention in fp32 and fp16 and the GPU in bf16 and fp16 (fp32 too: the engine uses it).
ATTN_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BLOCK_SIZES = [16, 256]


@interpreter_test
def test_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 20)


# ---------------------------------------------------------------------------------------------------------
# Helpers: paged cache construction and the fp32 reference
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # int32 [num_seqs, max_num_blocks], -1 padded
    k_lens: list[int]


def make_paged_kv(
    k_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    shared_prefix_blocks: int = 0,
    gen: torch.Generator | None = None,
) -> PagedKV:
    """Random paged caches holding `k_lens[i]` tokens per sequence in shuffled blocks.

    Sequence 1 reuses the first `shared_prefix_blocks` blocks of sequence 0 (prefix caching). Every slot no
    sequence owns (tails of partly filled blocks, free blocks) holds NaN, so any read of it shows up.
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in k_lens]
    num_owned = sum(blocks_per_seq) - (shared_prefix_blocks if len(k_lens) > 1 else 0)
    num_blocks = num_owned + 3  # a few free blocks
    max_num_blocks = max(blocks_per_seq) + 1  # at least one -1 pad column
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for i, nb in enumerate(blocks_per_seq):
        if i == 1 and shared_prefix_blocks:
            if min(k_lens[0], k_lens[1]) < shared_prefix_blocks * block_size:
                raise ValueError("shared prefix blocks must be full in both sequences")
            table = tables[0][:shared_prefix_blocks] + [perm.pop() for _ in range(nb - shared_prefix_blocks)]
        else:
            table = [perm.pop() for _ in range(nb)]
        tables.append(table)
    block_tables = torch.full((len(k_lens), max_num_blocks), -1, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    v_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    for table, n in zip(tables, k_lens, strict=True):
        for p in range(0, n, block_size):
            used = min(block_size, n - p)
            block = table[p // block_size]
            k_cache[block, :used] = torch.randn(used, num_kv_heads, head_dim, generator=gen)
            v_cache[block, :used] = torch.randn(used, num_kv_heads, head_dim, generator=gen)
    return PagedKV(
        k_cache.to(dtype=dtype, device=DEVICE),
        v_cache.to(dtype=dtype, device=DEVICE),
        block_tables.to(DEVICE),
        list(k_lens),
    )


def gather_seq(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) 0..length-1 of one sequence: [length, num_kv_heads, head_dim] in fp32."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = table.long()[pos // block_size] * block_size + pos % block_size
    flat = cache.reshape(-1, cache.shape[2], cache.shape[3])  # [num_slots, num_kv_heads, head_dim]
    return flat[slots].float()


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q_len queries at the last q_len positions of k_len keys, in fp32.

    q: [q_len, num_heads, head_dim]; k, v: [k_len, num_kv_heads, head_dim].
    Returns [q_len, num_heads, head_dim].
    """
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)  # [k_len, num_heads, head_dim]
    v = v.float().repeat_interleave(group, dim=1)  # [k_len, num_heads, head_dim]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [num_heads, q_len, k_len]
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
    k_pos = torch.arange(k_len, device=q.device)
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)  # [q_len, num_heads, head_dim]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(actual).any(), "NaN in kernel output (an unowned cache slot was read?)"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------------------
@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 128)])
def test_store_kvcache(dtype: torch.dtype, slot_dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> None:
    from nanovllm.kernels.kv_store import store_kvcache

    gen = make_gen(0)
    num_heads, block_size, num_blocks = 2 * num_kv_heads, 16, 5
    num_tokens = 40 if ON_GPU else 12
    width = (num_heads + 2 * num_kv_heads) * head_dim
    # key/value as strided slices of a fused qkv projection output.
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype=dtype, device=DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)  # [tokens, kv, dim]
    value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)  # [tokens, kv, dim]
    assert not key.is_contiguous()

    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # skipped tokens
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)  # poison
    v_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_expected.view(-1, num_kv_heads, head_dim)[slots[keep].to(DEVICE)] = key[keep.to(DEVICE)]
    v_expected.view(-1, num_kv_heads, head_dim)[slots[keep].to(DEVICE)] = value[keep.to(DEVICE)]

    store_kvcache(key, value, k_cache, v_cache, slots.to(dtype=slot_dtype, device=DEVICE))
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


# ---------------------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------------------
# (context lengths, num_kv_heads, group = num_heads / num_kv_heads, head_dim, shared prefix blocks of size 16)
if ON_GPU:
    DECODE_CASES = [
        ([1], 8, 2, 128, 0),
        ([4096], 8, 2, 128, 0),
        ([37, 1, 300, 1024, 2049], 2, 4, 64, 0),
        ([512, 700, 33], 1, 8, 128, 2),
        ([1000, 1000, 17, 5, 4000], 4, 1, 64, 16),
    ]
else:
    DECODE_CASES = [
        ([1], 2, 2, 64, 0),
        ([37, 5, 80], 2, 1, 64, 0),
        ([33, 48, 16], 1, 4, 64, 2),
        ([70], 1, 8, 64, 0),
        ([20, 49], 1, 2, 128, 1),
        ([300, 530, 7], 1, 2, 64, 17),
        ([9, 40], 2, 2, 16, 0),
        ([25], 1, 4, 32, 0),
    ]


def run_decode_case(
    k_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    shared: int,
    block_size: int,
    dtype: torch.dtype,
    splits_list: list[int | None],
    seed: int,
) -> None:
    from nanovllm.kernels.paged_attention import decode_attention

    gen = make_gen(seed)
    # Sharing is stated in 16-token blocks; scale it to the block size and drop it if it does not fit.
    shared_blocks = shared * 16 // block_size if shared else 0
    if len(k_lens) < 2 or min(k_lens[:2]) < shared_blocks * block_size:
        shared_blocks = 0
    kv = make_paged_kv(k_lens, block_size, num_kv_heads, head_dim, dtype, shared_blocks, gen)
    num_heads = num_kv_heads * group
    q = torch.randn(len(k_lens), num_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    context_lens = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    expected = torch.stack(
        [
            ref_attention(
                q[i : i + 1],
                gather_seq(kv.k_cache, kv.block_tables[i], n),
                gather_seq(kv.v_cache, kv.block_tables[i], n),
                scale,
            )[0]
            for i, n in enumerate(k_lens)
        ]
    )  # [batch, num_heads, head_dim]
    results = []
    for num_splits in splits_list:
        out = decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens, scale, num_splits=num_splits
        )
        assert out.shape == q.shape and out.dtype == dtype
        assert_close(out, expected, dtype)
        results.append(out.float())
    # Different split counts agree with each other more tightly than with the reference.
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@direct
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention(case: int, block_size: int, dtype: torch.dtype) -> None:
    k_lens, num_kv_heads, group, head_dim, shared = DECODE_CASES[case]
    splits = [1, 3, None] if not ON_GPU else [1, 4, 13, None]
    run_decode_case(k_lens, num_kv_heads, group, head_dim, shared, block_size, dtype, splits, seed=case)


@direct
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_decode_attention_sequence_first_launch(dtype: torch.dtype, monkeypatch) -> None:
    """The other launch order (DECODE_HEADS_FIRST off: the grid's first axis the sequence): every sequence,
    head and split still reads its own rows and writes its own partials."""
    from nanovllm.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "DECODE_HEADS_FIRST", False)
    k_lens, num_kv_heads, group, head_dim, shared = max(DECODE_CASES, key=lambda c: len(c[0]) * c[1])
    splits = [1, 3, None] if not ON_GPU else [1, 4, 13, None]
    run_decode_case(k_lens, num_kv_heads, group, head_dim, shared, 16, dtype, splits, seed=11)


@direct
@pytest.mark.skipif(not ON_GPU, reason="large batch: GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_large_batch(dtype: torch.dtype) -> None:
    gen = make_gen(7)
    k_lens = torch.randint(1, 4097, (256,), generator=gen).tolist()
    run_decode_case(k_lens, 4, 4, 128, 8, 256, dtype, [1, 2, None], seed=7)


@direct
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_attention_zero_context_padding_rows(num_splits: int) -> None:
    """Padding rows of a CUDA-graph batch (context_len 0, block table all -1) give zeros, others are exact."""
    from nanovllm.kernels.paged_attention import decode_attention

    gen = make_gen(11)
    kv = make_paged_kv([40, 1], 16, 1, 64, torch.float32, 0, gen)
    pad = torch.full((1, kv.block_tables.shape[1]), -1, dtype=torch.int32, device=DEVICE)
    block_tables = torch.cat([kv.block_tables, pad])  # [3, max_num_blocks]
    context_lens = torch.tensor([40, 1, 0], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 2, 64, generator=gen).to(DEVICE)
    out = decode_attention(
        q, kv.k_cache, kv.v_cache, block_tables, context_lens, 0.125, num_splits=num_splits
    )
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    for i, n in enumerate([40, 1]):
        k = gather_seq(kv.k_cache, block_tables[i], n)
        v = gather_seq(kv.v_cache, block_tables[i], n)
        assert_close(out[i], ref_attention(q[i : i + 1], k, v, 0.125)[0], torch.float32)


@direct
def test_decode_attention_out_argument_and_errors() -> None:
    from nanovllm.kernels.paged_attention import decode_attention

    gen = make_gen(3)
    kv = make_paged_kv([20, 9], 16, 1, 64, torch.float32, 0, gen)
    q = torch.randn(2, 2, 64, generator=gen).to(DEVICE)
    context_lens = torch.tensor([20, 9], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    result = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens, 0.125, out=out)
    assert result is out
    expected = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens, 0.125)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(
            q[:, :1].expand(2, 3, 64),
            kv.k_cache.expand(-1, -1, 2, -1),
            kv.v_cache.expand(-1, -1, 2, -1),
            kv.block_tables,
            context_lens,
            0.125,
        )
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(
            q[..., :48], kv.k_cache[..., :48], kv.v_cache[..., :48], kv.block_tables, context_lens, 0.125
        )


# ---------------------------------------------------------------------------------------------------------
# prefill_attention
# ---------------------------------------------------------------------------------------------------------
# (q lengths, num_kv_heads, group, head_dim)
if ON_GPU:
    PREFILL_CASES = [
        ([1024] * 3, 8, 2, 128),
        ([1, 17, 300, 999], 2, 4, 64),
        ([513, 64, 128], 1, 8, 128),
        ([77, 1000], 4, 1, 64),
        ([200, 3], 2, 7, 128),
    ]
else:
    PREFILL_CASES = [
        ([1, 37, 80], 2, 1, 64),
        ([50, 9], 1, 2, 64),
        ([70], 1, 4, 64),
        ([23, 40], 1, 8, 128),
        ([30], 1, 3, 64),
        ([19, 33], 2, 2, 16),
    ]


@direct
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_attention_contiguous(case: int, dtype: torch.dtype) -> None:
    from nanovllm.kernels.paged_attention import prefill_attention

    lens, num_kv_heads, group, head_dim = PREFILL_CASES[case]
    gen = make_gen(100 + case)
    total, num_heads = sum(lens), num_kv_heads * group
    width = (num_heads + 2 * num_kv_heads) * head_dim
    # k, v as strided slices of a fused qkv output, like the engine passes them.
    qkv = torch.randn(total, width, generator=gen).to(dtype=dtype, device=DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(total, num_heads, head_dim)  # [total, num_heads, head_dim]
    k = qkv[:, q_size : q_size + kv_size].view(total, num_kv_heads, head_dim)  # [total, kv_heads, head_dim]
    v = qkv[:, q_size + kv_size :].view(total, num_kv_heads, head_dim)  # [total, kv_heads, head_dim]
    cu = cu_seqlens(lens)
    scale = head_dim**-0.5
    out = prefill_attention(q, k, v, cu, cu, max(lens), max(lens), scale)
    assert out.shape == q.shape and out.dtype == dtype
    starts = cu.tolist()
    expected = torch.cat(
        [ref_attention(q[s:e], k[s:e], v[s:e], scale) for s, e in zip(starts[:-1], starts[1:], strict=True)]
    )  # [total, num_heads, head_dim]
    assert_close(out, expected, dtype)


# (q lengths, k lengths, num_kv_heads, group, head_dim, shared prefix blocks of size 16)
if ON_GPU:
    PREFIX_CASES = [
        ([100, 1000, 1], [612, 1000, 2049], 8, 2, 128, 16),
        ([5, 300], [300, 301], 2, 4, 64, 16),
        ([256, 17], [256, 4000], 1, 8, 128, 0),
        ([64, 1, 999], [1000, 1, 1000], 4, 1, 64, 0),
    ]
else:
    PREFIX_CASES = [
        ([9, 30, 17], [40, 80, 17], 1, 2, 64, 2),
        ([1, 20], [33, 20], 2, 1, 64, 0),
        ([16, 7], [48, 39], 1, 4, 64, 2),
        ([13], [61], 1, 8, 128, 0),
        # prefixes 62 and 30: the last fully visible key sits at the end of a key tile
        ([10, 3], [72, 33], 1, 2, 64, 0),
        ([40, 2], [530, 290], 1, 2, 64, 16),
    ]


@direct
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", range(len(PREFIX_CASES)))
def test_prefill_attention_paged_prefix(case: int, block_size: int, dtype: torch.dtype) -> None:
    from nanovllm.kernels.paged_attention import prefill_attention

    q_lens, k_lens, num_kv_heads, group, head_dim, shared = PREFIX_CASES[case]
    gen = make_gen(200 + case)
    shared_blocks = shared * 16 // block_size if shared else 0
    if len(k_lens) < 2 or min(k_lens[:2]) < shared_blocks * block_size:
        shared_blocks = 0
    kv = make_paged_kv(k_lens, block_size, num_kv_heads, head_dim, dtype, shared_blocks, gen)
    num_heads = num_kv_heads * group
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    out = prefill_attention(
        q, kv.k_cache, kv.v_cache, cu_q, cu_k, max(q_lens), max(k_lens), scale, kv.block_tables
    )
    starts = cu_q.tolist()
    expected = torch.cat(
        [
            ref_attention(
                q[starts[i] : starts[i + 1]],
                gather_seq(kv.k_cache, kv.block_tables[i], n),
                gather_seq(kv.v_cache, kv.block_tables[i], n),
                scale,
            )
            for i, n in enumerate(k_lens)
        ]
    )  # [total_q, num_heads, head_dim]
    assert_close(out, expected, dtype)


@direct
def test_prefill_matches_decode_for_last_token() -> None:
    """The last query of a paged prefill equals a decode step over the same context; `out` is honoured."""
    from nanovllm.kernels.paged_attention import decode_attention, prefill_attention

    gen = make_gen(5)
    k_lens, q_lens = [45, 20], [5, 20]
    kv = make_paged_kv(k_lens, 16, 2, 64, torch.float32, 0, gen)
    q = torch.randn(sum(q_lens), 4, 64, generator=gen).to(DEVICE)
    out = torch.empty_like(q)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    result = prefill_attention(q, kv.k_cache, kv.v_cache, cu_q, cu_k, 20, 45, 0.125, kv.block_tables, out=out)
    assert result is out
    last = torch.tensor([4, 24], device=DEVICE)
    context_lens = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    decoded = decode_attention(
        q[last], kv.k_cache, kv.v_cache, kv.block_tables, context_lens, 0.125, num_splits=2
    )
    torch.testing.assert_close(out[last], decoded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_prefill_refuses_a_scale_that_is_not_positive(scale: float) -> None:
    """The kernel takes its row maxima of the unscaled scores, which only a positive scale preserves."""
    from nanovllm.kernels.paged_attention import prefill_attention

    q = k = v = torch.zeros(4, 2, 64, device=DEVICE)
    cu = cu_seqlens([4])
    with pytest.raises(ValueError, match="must be positive"):
        prefill_attention(q, k, v, cu, cu, 4, 4, scale)


# ---------------------------------------------------------------------------------------------------------
# Truncation thresholds (top-k, top-p, min-p without a sort)
# ---------------------------------------------------------------------------------------------------------
def make_truncation_case(num_rows: int, vocab: int, dtype: torch.dtype, gen: torch.Generator):
    """Rows covering each rule alone, combined, off, at temperature 0, with many ties and with -inf."""
    logits = torch.randn(num_rows, vocab, generator=gen) * 4
    logits[0::5] = logits[0::5].round()  # a few dozen distinct values: ties at every boundary
    logits[1::5, : vocab // 3] = float("-inf")  # masked tokens (padding, bad words)
    logits = logits.to(dtype)
    temperatures = torch.rand(num_rows, generator=gen) * 1.5 + 0.2
    top_k = torch.randint(1, 200, (num_rows,), generator=gen)
    top_p = torch.rand(num_rows, generator=gen) * 0.95 + 0.02
    min_p = torch.rand(num_rows, generator=gen) * 0.3
    rule = torch.arange(num_rows) % 7  # 0: top-k, 1: top-p, 2: min-p, 3: all off, 4: greedy, 5-6: all
    top_k[(rule == 1) | (rule == 2) | (rule == 3) | (rule == 4)] = vocab
    top_k[5] = 1
    top_p[(rule == 0) | (rule == 2) | (rule == 3)] = 1.0
    min_p[(rule == 0) | (rule == 1) | (rule == 3)] = 0.0
    temperatures[rule == 4] = 0.0
    # A flat distribution cut by top-k first: top-p must weigh what top-k keeps, not the whole row.
    temperatures[rule == 6], top_k[rule == 6], top_p[rule == 6] = 2.0, 50, 0.5
    return logits, temperatures, top_k, top_p, min_p


@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_truncation_thresholds_match_the_sorted_reference(dtype: torch.dtype) -> None:
    """Top-k thresholds equal the k-th largest logit exactly. Top-p and min-p compare sums and logs,
    whose float32 rounding differs from the reference's: the kernel's threshold must lie between the
    float64 reference's for top_p and min_p moved by a relative 1e-4 either way (thresholds fall as
    top_p rises and rise with min_p)."""
    from nanovllm.kernels.truncation import truncation_thresholds
    from nanovllm.layers.sampler import reference_thresholds

    num_rows, vocab = (70, 151936) if ON_GPU else (14, 1500)
    logits, temps, top_k, top_p, min_p = make_truncation_case(num_rows, vocab, dtype, make_gen(300))
    out = truncation_thresholds(*(t.to(DEVICE) for t in (logits, temps, top_k, top_p, min_p))).cpu()

    exact = reference_thresholds(logits.double(), temps, top_k, top_p, min_p)
    low = reference_thresholds(logits.double(), temps, top_k, (top_p * 1.0001).clamp(max=1), min_p * 0.9999)
    high = reference_thresholds(logits.double(), temps, top_k, top_p * 0.9999, min_p * 1.0001)
    assert torch.all((low <= out) & (out <= high)), (out, low, high)
    only_k = (top_p == 1) & (min_p == 0)
    assert torch.equal(out[only_k], exact[only_k])
    assert torch.all(out[temps == 0] == float("-inf"))
    assert torch.all(out[(top_k == vocab) & (top_p == 1) & (min_p == 0)] == float("-inf"))
    assert out[5] == logits[5].float().max()  # top_k = 1
    # Mostly the same float either way: boundaries within rounding are rare.
    assert (out == exact).float().mean() > 0.8, (out, exact)
    # Ties at a top-k boundary are all kept: a rounded row keeps more than k tokens.
    for row in range(0, num_rows, 5):
        if top_k[row] < vocab and top_p[row] == 1 and min_p[row] == 0:
            assert (logits[row].float() >= out[row]).sum() >= top_k[row]


@direct
def test_truncation_thresholds_of_strided_rows_and_empty_batches() -> None:
    from nanovllm.kernels.truncation import truncation_thresholds

    gen = make_gen(301)
    wide = torch.randn(3, 700, generator=gen).to(DEVICE)
    logits = wide[:, :600]  # rows 700 apart
    ones = torch.ones(3, device=DEVICE)
    top_k = torch.tensor([1, 10, 600], device=DEVICE)
    out = truncation_thresholds(logits, ones, top_k, ones, torch.zeros(3, device=DEVICE))
    expected = logits.sort(dim=-1, descending=True).values[:, [0, 9]].diagonal()
    assert torch.equal(out[:2], expected)
    assert out[2] == float("-inf")
    empty = torch.empty(0, device=DEVICE)
    assert truncation_thresholds(logits[:0], empty, top_k[:0], empty, empty).shape == (0,)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        truncation_thresholds(logits.double(), ones, top_k, ones, ones)


# ---------------------------------------------------------------------------------------------------------
# The sampler's draw
# ---------------------------------------------------------------------------------------------------------


def _draw_case(num_rows: int, vocab: int, dtype: torch.dtype, seed: int):
    """Logits with ties at the top in some rows, temperatures 0 (greedy) to 2, thresholds on half the rows
    (from the reference rule), and hashed-noise keys."""
    from nanovllm.layers.sampler import reference_thresholds

    gen = make_gen(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(dtype)
    logits[1, [7, vocab // 2, vocab - 1]] = logits[1].max() + 1  # a three-way tie for the largest logit
    logits[2, :] = 0.5  # every token tied
    temps = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 0.7, 1.3])[torch.arange(num_rows) % 8]
    top_k = torch.where(torch.arange(num_rows) % 2 == 0, 20, vocab)
    thresholds = reference_thresholds(
        logits, temps, top_k, torch.full((num_rows,), 0.9), torch.zeros(num_rows)
    )
    keys = torch.randint(0, 2**32, (num_rows, 2), generator=gen, dtype=torch.int64)
    return logits, temps, thresholds, keys


@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_programs", [2048, 36])  # chunks of 1,024 logits, and of 4,096
def test_draw_kernel_matches_the_torch_draw_with_hashed_noise(
    dtype: torch.dtype, target_programs: int, monkeypatch
) -> None:
    """With keys the kernel uses the same uniforms as the torch draw, so the tokens must be the same,
    thresholds and greedy rows (ties: the smallest token id, as torch.argmax) included."""
    from nanovllm.kernels import draw as D
    from nanovllm.layers.sampler import reference_sample

    monkeypatch.setattr(D, "TARGET_PROGRAMS", target_programs)
    num_rows, vocab = 12, 9000
    assert D.chunk_size(num_rows, vocab) == (1024 if target_programs == 2048 else 4096)
    logits, temps, thresholds, keys = _draw_case(num_rows, vocab, dtype, seed=400)
    expected = reference_sample(logits, temps, keys, thresholds)
    assert expected[1] == 7 and expected[2] == 0  # greedy rows: the first of the tied tokens
    for with_thresholds in (True, False):
        got = D.draw(
            logits.to(DEVICE),
            temps.to(DEVICE),
            keys.to(DEVICE),
            thresholds.to(DEVICE) if with_thresholds else None,
        ).cpu()
        want = expected if with_thresholds else reference_sample(logits, temps, keys, None)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (got, want)


@direct
def test_draw_kernel_philox_noise_draws_the_right_distribution() -> None:
    """Without keys: rows of the same four logits at temperature 1 draw tokens in proportion to their
    probabilities, and a threshold removes the tokens below it. (The interpreter runs a program in
    milliseconds, so it draws fewer rows and allows more: about 4.5 standard deviations either way.)"""
    from nanovllm.kernels.draw import draw

    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    n = 20000 if ON_GPU else 500
    tolerance = 4.5 * math.sqrt(0.25 / n)
    logits = probs.log().repeat(n, 1).to(DEVICE)
    ones = torch.ones(n, device=DEVICE)
    torch.manual_seed(0)
    counts = torch.bincount(draw(logits, ones, None, None).cpu(), minlength=4).double() / n
    assert torch.allclose(counts, probs.double(), atol=tolerance), counts
    cut = torch.full((n,), math.log(0.2), device=DEVICE)  # keeps 0.5 and 0.25
    counts = torch.bincount(draw(logits, ones, None, cut).cpu(), minlength=4).double() / n
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] - 2 / 3) < tolerance, counts
    # A new call draws new noise; the same torch seed repeats it.
    rows = logits[:100]
    torch.manual_seed(5)
    a = draw(rows, ones[:100], None, None).cpu()
    b = draw(rows, ones[:100], None, None).cpu()
    torch.manual_seed(5)
    assert not torch.equal(a, b) and torch.equal(a, draw(rows, ones[:100], None, None).cpu())


@direct
def test_draw_kernel_philox_quarters_and_blocks_have_independent_noise() -> None:
    """One Philox evaluation gives the uniforms of four columns a quarter-block apart (BLOCK / 4), so
    columns j + k * BLOCK / 4 (k = 0 .. 7: both quarters' outputs and two blocks' counters) are the only
    finite, equal logits of each row: each must win 1/8 of the rows. Shared or reused uniforms would tie
    and hand the smaller token id every such draw. NaN and -inf logits around them are never picked."""
    from nanovllm.kernels import draw as D

    quarter = D.BLOCK // 4
    n = 20000 if ON_GPU else 800
    tolerance = 4.5 * math.sqrt((1 / 8) * (7 / 8) / n)
    for j in (0, quarter - 1):  # the first and the last lane
        candidates = j + quarter * torch.arange(8)
        logits = torch.full((n, 2 * D.BLOCK), float("-inf"))
        logits[:, 1::3] = float("nan")
        logits[:, candidates] = 0.25
        ones = torch.ones(n, device=DEVICE)
        torch.manual_seed(j)
        tokens = D.draw(logits.to(DEVICE), ones, None, None).cpu()
        assert torch.isin(tokens, candidates).all(), tokens
        counts = torch.bincount((tokens - j) // quarter, minlength=8).double() / n
        assert torch.allclose(counts, torch.full((8,), 1 / 8, dtype=torch.float64), atol=tolerance), counts


@pytest.mark.skipif(INTERPRET, reason="compiles for sm_90; run in the parent session")
@pytest.mark.parametrize("has_thresholds", [False, True])
@pytest.mark.parametrize("has_keys", [False, True])
def test_draw_kernel_compiles_for_sm90(has_keys: bool, has_thresholds: bool) -> None:
    """Compiled for an H200 (no GPU needed). Without keys one Philox evaluation per lane (10 rounds, two
    32-bit high multiplies each, on quarter-block tensors) serves the four quarters of a block, and the
    last log is the hardware's lg2.approx; the hashed branch has no Philox."""
    from nanovllm.kernels import draw as D

    fn = D._draw_chunks_kernel
    signature = dict(logits_ptr="*bf16", stride_row="i32", temps_ptr="*fp32", keys_ptr="*i64")
    signature.update(thresholds_ptr="*fp32", seed="i64", score_out="*fp32", score_idx_out="*i32")
    signature.update(max_out="*fp32", max_idx_out="*i32", vocab="i32", chunk="i32", num_chunks="i32")
    constants = dict(HAS_KEYS=has_keys, HAS_THRESHOLDS=has_thresholds, FAST_LOG=True, BLOCK=D.BLOCK)
    asm = compile_for_sm90(fn, signature, constants, num_warps=D.NUM_WARPS)
    ttgir = asm["ttgir"]
    mulhi = [line for line in ttgir.splitlines() if "tt.mulhiui" in line and "tensor<" in line]
    if has_keys:
        assert not mulhi
    else:
        # 20 at most: the first round's multiplies of the zero counter words may be folded to constants.
        assert 10 < len(mulhi) <= 20, len(mulhi)
        assert all(f"tensor<{D.BLOCK // 4}xi32" in line for line in mulhi), mulhi
        assert "lg2.approx" in asm["ptx"]


@direct
def test_draw_kernel_strided_rows_and_empty_batches() -> None:
    from nanovllm.kernels.draw import draw
    from nanovllm.layers.sampler import reference_sample

    wide = torch.randn(3, 2 * 1500, generator=make_gen(7))
    logits = wide[:, :1500]  # rows 3,000 apart
    keys = torch.tensor([[1, 2], [3, 4], [5, 6]])
    temps = torch.tensor([0.0, 1.0, 0.8])
    got = draw(logits.to(DEVICE), temps.to(DEVICE), keys.to(DEVICE), None).cpu()
    assert torch.equal(got, reference_sample(logits, temps, keys))
    empty = torch.empty(0, device=DEVICE)
    assert draw(logits[:0].to(DEVICE), empty, None, None).shape == (0,)
