"""Sliding-window attention: the Triton prefill and decode kernels (under TRITON_INTERPRET=1 on CPU, in a
subprocess, small shapes; directly on a GPU) and the PyTorch backend, against a plain fp32 reference
with transformers' window (a query at position i sees keys i - W < j <= i). Blocks wholly before every
query's window are "freed": their table entries point at a block full of NaN (the kernels) or are -1
(the PyTorch backend), so any read of them shows up."""

import math

import pytest
import torch

from tests.kernels.interpreter import DEVICE, ON_GPU, direct, interpreter_test, run_file_under_interpreter
from tests.kernels.test_triton_kernels import (
    assert_close,
    cu_seqlens,
    make_gen,
    make_paged_kv,
)
from tests.kernels.test_triton_kernels import gather_seq as gather_all

DTYPES = [torch.float32, torch.float16] if not ON_GPU else [torch.float32, torch.bfloat16]


@interpreter_test
def test_window_kernels_under_triton_interpreter() -> None:
    run_file_under_interpreter(__file__, 8)


def ref_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None):
    """q [q_len, heads, dim] at the last q_len positions of k [k_len, kv_heads, dim], fp32, windowed."""
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)  # [k_len, num_heads, head_dim]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [num_heads, q_len, k_len]
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
    k_pos = torch.arange(k_len, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= k_pos <= q_pos - window
    probs = torch.softmax(scores.masked_fill(hidden[None], float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)  # [q_len, num_heads, head_dim]


def free_blocks_before(kv, first_needed: list[int], freed_entry: int) -> torch.Tensor:
    """A copy of the block tables whose entries for blocks wholly before `first_needed[i]` (the first
    key any query of sequence i sees) are replaced by `freed_entry`; the original tables stay for the
    reference."""
    block_size = kv.k_cache.shape[1]
    tables = kv.block_tables.clone()
    for i, first in enumerate(first_needed):
        dead = max(0, first) // block_size
        tables[i, :dead] = freed_entry
    return tables


def with_poison_block(kv) -> int:
    """Append a NaN block to the caches (returns its id): freed table entries point there."""
    poison = torch.full_like(kv.k_cache[:1], float("nan"))
    kv.k_cache = torch.cat([kv.k_cache, poison])
    kv.v_cache = torch.cat([kv.v_cache, poison])
    return kv.k_cache.shape[0] - 1


# (context lengths, num_kv_heads, group, head_dim, window, block_size)
DECODE_CASES = [
    ([70, 5, 33], 1, 2, 32, 20, 16),
    ([100, 64], 2, 1, 16, 16, 16),  # the window is one block, block-aligned contexts
    ([47], 1, 4, 32, 1, 16),  # the query's own key only
    ([50, 90], 1, 2, 32, 200, 16),  # a window longer than every context: full attention
]
if ON_GPU:
    DECODE_CASES += [([4096, 131, 20000], 8, 2, 128, 4096, 256), ([32768], 8, 2, 128, 1000, 256)]


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_windowed_decode(case: int, dtype: torch.dtype) -> None:
    from nanovllm.kernels.paged_attention import decode_attention

    lens, num_kv_heads, group, head_dim, window, block_size = DECODE_CASES[case]
    gen = make_gen(200 + case)
    kv = make_paged_kv(lens, block_size, num_kv_heads, head_dim, dtype, 0, gen)
    full_tables = kv.block_tables
    poison = with_poison_block(kv)
    tables = free_blocks_before(kv, [n - window for n in lens], poison)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    expected = torch.stack(
        [
            ref_window(
                q[i : i + 1],
                gather_all(kv.k_cache, full_tables[i], n),
                gather_all(kv.v_cache, full_tables[i], n),
                scale,
                window,
            )[0]
            for i, n in enumerate(lens)
        ]
    )
    for num_splits in [1, 3, None] if not ON_GPU else [1, 8, None]:
        out = decode_attention(
            q,
            kv.k_cache,
            kv.v_cache,
            tables,
            context_lens,
            scale,
            num_splits=num_splits,
            sliding_window=window,
        )
        assert_close(out, expected, dtype)


# (q lengths, k lengths, num_kv_heads, group, head_dim, window, paged)
PREFILL_CASES = [
    ([40, 9], [40, 9], 1, 2, 32, 7, False),  # no prefix, contiguous K/V
    ([33], [33], 2, 1, 16, 33, False),  # the window as long as the prompt
    ([9, 30], [40, 80], 1, 2, 32, 20, True),  # cached prefixes, freed blocks before the windows
    ([70], [100], 1, 4, 32, 16, True),  # query tiles longer than the window (masked on both sides)
    ([5, 17], [60, 17], 2, 2, 16, 1, True),
]
if ON_GPU:
    PREFILL_CASES += [
        ([4096, 300], [8192, 300], 8, 2, 128, 1000, True),
        ([2048], [2048], 8, 2, 128, 4096, False),
    ]


@direct
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_windowed_prefill(case: int, dtype: torch.dtype) -> None:
    from nanovllm.kernels.paged_attention import prefill_attention

    q_lens, k_lens, num_kv_heads, group, head_dim, window, paged = PREFILL_CASES[case]
    gen = make_gen(300 + case)
    num_heads = num_kv_heads * group
    scale = head_dim**-0.5
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    starts = cu_q.tolist()
    if paged:
        kv = make_paged_kv(k_lens, 16, num_kv_heads, head_dim, dtype, 0, gen)
        full_tables = kv.block_tables
        poison = with_poison_block(kv)
        tables = free_blocks_before(kv, [kl - ql - window + 1 for ql, kl in zip(q_lens, k_lens)], poison)
        out = prefill_attention(
            q,
            kv.k_cache,
            kv.v_cache,
            cu_q,
            cu_k,
            max(q_lens),
            max(k_lens),
            scale,
            tables,
            sliding_window=window,
        )
        keys = [gather_all(kv.k_cache, full_tables[i], n) for i, n in enumerate(k_lens)]
        values = [gather_all(kv.v_cache, full_tables[i], n) for i, n in enumerate(k_lens)]
    else:
        k = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
        v = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
        out = prefill_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale, sliding_window=window)
        keys = [k[s:e] for s, e in zip(starts[:-1], starts[1:])]
        values = [v[s:e] for s, e in zip(starts[:-1], starts[1:])]
    expected = torch.cat(
        [
            ref_window(q[s:e], keys[i], values[i], scale, window)
            for i, (s, e) in enumerate(zip(starts[:-1], starts[1:]))
        ]
    )
    assert_close(out, expected, dtype)


@direct
def test_window_argument_is_checked() -> None:
    from nanovllm.kernels.paged_attention import decode_attention

    kv = make_paged_kv([20], 16, 1, 32, torch.float32, 0, make_gen(1))
    q = torch.randn(1, 2, 32).to(DEVICE)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, torch.tensor([20], dtype=torch.int32, device=DEVICE),
            0.1, sliding_window=0,
        )  # fmt: skip


# ---- the PyTorch backend (plain CPU path, no interpreter) ------------------------------------------------
def _torch_meta(**kwargs):
    from nanovllm.utils.context import AttentionMetadata

    return AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64), **kwargs)


@pytest.mark.parametrize("window", [1, 7, 20, None])
def test_torch_backend_windows_with_freed_entries(window, monkeypatch):
    """Decode and prefill (with a cached prefix, several query tiles) over tables whose blocks before
    the windows are -1."""
    from nanovllm.attention import torch_backend
    from nanovllm.attention.torch_backend import TorchAttentionBackend

    backend = TorchAttentionBackend()
    gen = make_gen(5)
    lens = [70, 33, 9]
    kv = make_paged_kv(lens, 16, 2, 16, torch.float32, 0, gen)
    kv.k_cache, kv.v_cache = kv.k_cache.nan_to_num(), kv.v_cache.nan_to_num()
    scale = 0.25
    w = window or 10**6
    keys = [gather_all(kv.k_cache, kv.block_tables[i], n) for i, n in enumerate(lens)]
    values = [gather_all(kv.v_cache, kv.block_tables[i], n) for i, n in enumerate(lens)]

    q = torch.randn(len(lens), 4, 16, generator=gen)
    tables = free_blocks_before(kv, [n - w for n in lens], -1)
    meta = _torch_meta(
        is_prefill=False,
        context_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables,
        seqlens_k=lens,
    )
    out = backend.decode(q, kv.k_cache, kv.v_cache, meta, scale, window)
    for i in range(len(lens)):
        expected = ref_window(q[i : i + 1], keys[i], values[i], scale, window)[0]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)

    q_lens = [40, 2, 9]
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    tables = free_blocks_before(kv, [kl - ql - w + 1 for ql, kl in zip(q_lens, lens)], -1)
    meta = _torch_meta(is_prefill=True, block_tables=tables, seqlens_q=q_lens, seqlens_k=lens)
    monkeypatch.setattr(torch_backend, "PREFILL_QUERY_TILE", 16)  # several tiles per prompt
    out = backend.prefill(q, None, None, kv.k_cache, kv.v_cache, meta, scale, window)
    start = 0
    for i, ql in enumerate(q_lens):
        expected = ref_window(q[start : start + ql], keys[i], values[i], scale, window)
        torch.testing.assert_close(out[start : start + ql], expected, rtol=1e-5, atol=1e-5)
        start += ql
    assert math.isfinite(out.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="flash-attn runs on CUDA only")
@pytest.mark.parametrize("window", [1000, 4096])
def test_flash_attn_backend_windows(window):
    """flash-attn's window_size=(W - 1, 0) gives transformers' count, decode and prefill with a prefix,
    over tables whose blocks before the windows name block 0 (as the model runner passes them)."""
    flash_attn = pytest.importorskip("flash_attn")
    del flash_attn
    from nanovllm.attention.flash_attn_backend import FlashAttnBackend

    backend = FlashAttnBackend()
    gen = make_gen(21)
    lens = [5000, 1200, 9000]
    kv = make_paged_kv(lens, 256, 8, 128, torch.bfloat16, 0, gen)
    kv.k_cache, kv.v_cache = kv.k_cache.nan_to_num(), kv.v_cache.nan_to_num()
    keys = [gather_all(kv.k_cache, kv.block_tables[i], n) for i, n in enumerate(lens)]
    values = [gather_all(kv.v_cache, kv.block_tables[i], n) for i, n in enumerate(lens)]
    scale = 128**-0.5
    q = torch.randn(len(lens), 16, 128, generator=gen).to(dtype=torch.bfloat16, device=DEVICE)
    tables = free_blocks_before(kv, [n - window for n in lens], 0)
    meta = _torch_meta(
        is_prefill=False,
        context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables,
        seqlens_k=lens,
        num_splits=1,
    )
    out = backend.decode(q, kv.k_cache, kv.v_cache, meta, scale, window)
    for i in range(len(lens)):
        assert_close(out[i], ref_window(q[i : i + 1], keys[i], values[i], scale, window)[0], torch.bfloat16)
    q_lens = [700, 1, 3000]
    q = torch.randn(sum(q_lens), 16, 128, generator=gen).to(dtype=torch.bfloat16, device=DEVICE)
    tables = free_blocks_before(kv, [kl - ql - window + 1 for ql, kl in zip(q_lens, lens)], 0)
    meta = _torch_meta(
        is_prefill=True,
        cu_seqlens_q=cu_seqlens(q_lens),
        cu_seqlens_k=cu_seqlens(lens),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(lens),
        block_tables=tables,
        seqlens_q=q_lens,
        seqlens_k=lens,
    )
    out = backend.prefill(q, None, None, kv.k_cache, kv.v_cache, meta, scale, window)
    start = 0
    for i, ql in enumerate(q_lens):
        expected = ref_window(q[start : start + ql], keys[i], values[i], scale, window)
        assert_close(out[start : start + ql], expected, torch.bfloat16)
        start += ql
