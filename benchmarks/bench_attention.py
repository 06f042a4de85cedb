"""Benchmark the Triton paged-attention kernels on the GPU against the copy bandwidth and flash-attn.

Usage: PYTHONPATH=. python3 benchmarks/bench_attention.py [--json PATH]

Qwen3-0.6B attention shapes (16 query heads, 8 KV heads, head_dim 128), bf16, KV block size 256:
- device-to-device copy bandwidth (the ceiling for decode);
- decode at batch 256 x 1024, 16 x 4096 and 1 x 4096 cached tokens through a shuffled block table, with
  automatic split-K and with num_splits=1, plus flash-attn's paged decode and dense torch SDPA if present;
- causal prefill 8 x 1024 (contiguous K/V), plus flash-attn's varlen prefill if present.
Every kernel is checked against an fp32 reference before it is timed. Times are medians of do_bench
(L2 flushed between runs); decode kernels are replayed from a CUDA graph, as the engine runs them.
"""

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton

from nanovllm.kernels.paged_attention import decode_attention, default_num_splits, prefill_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
BLOCK_SIZE = 256
DTYPE = torch.bfloat16
DECODE_SHAPES = [(256, 1024), (16, 4096), (1, 4096)]  # (batch, cached tokens per sequence)
PREFILL_SHAPE = (8, 1024)  # (sequences, tokens per sequence)
COPY_BYTES = 1 << 30  # large enough to defeat the L2 cache (50 MiB on H100)
REF_SEQS = 8  # sequences checked against the reference per decode shape (keeps validation quick)
WARMUP_MS, REP_MS = 25, 200

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    HAVE_FLASH_ATTN = True
except Exception:  # noqa: BLE001 - a missing or broken build both mean "not available"
    HAVE_FLASH_ATTN = False


@dataclass
class Row:
    name: str
    shape: str
    time_us: float
    metric: float  # TB/s for decode and copy, TFLOP/s for prefill
    unit: str
    frac_of_copy: float | None = None


def bench(fn: Callable[[], object]) -> float:
    """Median time of fn in microseconds."""
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3


def bench_graph(fn: Callable[[], object]) -> float:
    """Median time of fn replayed from a CUDA graph, in microseconds: the engine runs decode inside a
    graph, and timing eager launches would add the Python launch cost of small kernels."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def copy_bandwidth() -> Row:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    tbps = 2 * COPY_BYTES / (t * 1e-6) / 1e12  # bytes read + written
    return Row("device copy (clone)", f"{COPY_BYTES >> 20} MiB", t, tbps, "TB/s", 1.0)


def make_decode_inputs(batch: int, ctx: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    blocks_per_seq = math.ceil(ctx / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq)  # [batch, max_num_blocks], shuffled block ids
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)


def gather_dense(cache: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """[batch, num_kv_heads, ctx, head_dim] copy of the first ctx tokens of every sequence."""
    batch = block_tables.shape[0]
    dense = cache[block_tables.long()]  # [batch, blocks_per_seq, block_size, num_kv_heads, head_dim]
    dense = dense.flatten(1, 2)[:, :ctx]  # [batch, ctx, num_kv_heads, head_dim]
    return dense.transpose(1, 2).contiguous().view(batch, NUM_KV_HEADS, ctx, HEAD_DIM)


def reference_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [batch, heads, dim], dense k/v [batch, kv_heads, ctx, dim] -> [batch, heads, dim] in fp32."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = k.float().repeat_interleave(group, dim=1)  # [batch, heads, ctx, dim]
    v = v.float().repeat_interleave(group, dim=1)  # [batch, heads, ctx, dim]
    probs = torch.softmax(torch.einsum("bhd,bhkd->bhk", q.float(), k) * scale, dim=-1)  # [batch, heads, ctx]
    return torch.einsum("bhk,bhkd->bhd", probs, v)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def bench_decode(batch: int, ctx: int, copy_tbps: float, gen: torch.Generator) -> list[Row]:
    x = make_decode_inputs(batch, ctx, gen)
    q, kc, vc, bt, cl = x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["context_lens"]
    scale = HEAD_DIM**-0.5
    kv_bytes = batch * ctx * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize  # K and V, once per KV head
    auto_splits = default_num_splits(q.device, batch, NUM_KV_HEADS, bt.shape[1], BLOCK_SIZE)
    shape = f"{batch} x {ctx}"

    n_ref = min(batch, REF_SEQS)
    k_dense = gather_dense(kc, bt[:n_ref], ctx)  # [n_ref, kv_heads, ctx, dim]
    v_dense = gather_dense(vc, bt[:n_ref], ctx)  # [n_ref, kv_heads, ctx, dim]
    expected = reference_decode(q[:n_ref], k_dense, v_dense, scale)

    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (f"triton decode (auto splits={auto_splits})", lambda: decode_attention(q, kc, vc, bt, cl, scale)),
        ("triton decode (num_splits=1)", lambda: decode_attention(q, kc, vc, bt, cl, scale, num_splits=1)),
    ]
    if HAVE_FLASH_ATTN:
        q4 = q.unsqueeze(1)  # [batch, 1, heads, dim]
        candidates.append(
            (
                "flash_attn_with_kvcache (paged)",
                lambda: flash_attn_with_kvcache(
                    q4, kc, vc, cache_seqlens=cl, block_table=bt, softmax_scale=scale, causal=True
                ).squeeze(1),
            )
        )
    rows = []
    for name, fn in candidates:
        err = max_err(fn()[:n_ref], expected)
        print(f"  check {name:40s} {shape:>12s}: max abs err vs fp32 reference {err:.2e}")
        t = bench_graph(fn)
        tbps = kv_bytes / (t * 1e-6) / 1e12
        rows.append(Row(name, shape, t, tbps, "TB/s", tbps / copy_tbps))

    # Dense torch SDPA on contiguous [batch, kv_heads, ctx, dim] K/V: the bandwidth a non-paged kernel gets.
    k_all = gather_dense(kc, bt, ctx)  # [batch, kv_heads, ctx, dim]
    v_all = gather_dense(vc, bt, ctx)  # [batch, kv_heads, ctx, dim]
    q_sdpa = q.unsqueeze(2)  # [batch, heads, 1, dim]

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q_sdpa, k_all, v_all, scale=scale, enable_gqa=True)
        return out.squeeze(2)  # [batch, heads, dim]

    err = max_err(sdpa()[:n_ref], expected)
    print(f"  check {'torch SDPA dense (enable_gqa)':40s} {shape:>12s}: max abs err {err:.2e}")
    t = bench_graph(sdpa)
    tbps = kv_bytes / (t * 1e-6) / 1e12
    rows.append(Row("torch SDPA dense (enable_gqa)", shape, t, tbps, "TB/s", tbps / copy_tbps))
    return rows


def bench_prefill(num_seqs: int, seq_len: int, gen: torch.Generator) -> list[Row]:
    total = num_seqs * seq_len
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    cu = torch.arange(0, total + 1, seq_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM**-0.5
    flops = num_seqs * 4 * (seq_len**2 / 2) * NUM_HEADS * HEAD_DIM  # causal: half of 4 * L^2 * H * D
    shape = f"{num_seqs} x {seq_len}"

    # Reference for the first two sequences: fp32 SDPA with GQA expanded.
    group = NUM_HEADS // NUM_KV_HEADS
    n_ref = min(2, num_seqs) * seq_len
    q_ref = q[:n_ref].float().view(-1, seq_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)  # [n, heads, L, dim]
    k_ref = k[:n_ref].float().view(-1, seq_len, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)  # [n, kv, L, dim]
    v_ref = v[:n_ref].float().view(-1, seq_len, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)  # [n, kv, L, dim]
    expected = F.scaled_dot_product_attention(
        q_ref,
        k_ref.repeat_interleave(group, 1),
        v_ref.repeat_interleave(group, 1),
        is_causal=True,
        scale=scale,
    )  # [n, heads, L, dim]
    expected = expected.transpose(1, 2).reshape(n_ref, NUM_HEADS, HEAD_DIM)  # [n_ref, heads, dim]

    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("triton prefill (contiguous)", lambda: prefill_attention(q, k, v, cu, cu, seq_len, seq_len, scale)),
    ]
    if HAVE_FLASH_ATTN:
        candidates.append(
            (
                "flash_attn_varlen_func",
                lambda: flash_attn_varlen_func(
                    q, k, v, cu, cu, seq_len, seq_len, softmax_scale=scale, causal=True
                ),
            )
        )
    rows = []
    for name, fn in candidates:
        err = max_err(fn()[:n_ref], expected)
        print(f"  check {name:40s} {shape:>12s}: max abs err vs fp32 reference {err:.2e}")
        t = bench(fn)
        rows.append(Row(name, shape, t, flops / (t * 1e-6) / 1e12, "TFLOP/s"))
    return rows


def print_table(rows: list[Row]) -> None:
    print()
    print(f"{'kernel':42s} {'shape':>12s} {'time us':>10s} {'rate':>16s} {'of copy':>8s}")
    for r in rows:
        frac = f"{100 * r.frac_of_copy:7.1f}%" if r.frac_of_copy is not None else ""
        rate = f"{r.metric:8.2f} {r.unit}"
        print(f"{r.name:42s} {r.shape:>12s} {r.time_us:10.1f} {rate:>16s} {frac:>8s}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")

    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), flash_attn: {HAVE_FLASH_ATTN}")
    rows = [copy_bandwidth()]
    copy_tbps = rows[0].metric
    for batch, ctx in DECODE_SHAPES:
        rows += bench_decode(batch, ctx, copy_tbps, gen)
        torch.cuda.empty_cache()
    rows += bench_prefill(*PREFILL_SHAPE, gen)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
