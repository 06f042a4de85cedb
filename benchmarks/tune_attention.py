"""Sweep the Triton decode-attention tunables on the GPU at the batch sizes and contexts the engine runs.

Usage: PYTHONPATH=. python3 benchmarks/tune_attention.py [--json PATH] [--quick] [--kv-cache-dtype fp8]
                                                        [--kernel-only]

Stage 1 times every (TILE_N, num_warps, num_stages, launch order) kernel configuration with the automatic
split count; stage 2 takes the best kernel configuration of each shape and sweeps the split-count rule
(DECODE_PROGRAMS_PER_SM, DECODE_MIN_TOKENS_PER_SPLIT; --kernel-only skips it). Shapes are Qwen3-0.6B
heads (16 query, 8 KV, head_dim 128), bf16 queries, a bf16 or (--kv-cache-dtype fp8) e4m3 cache, block
size 256, a block table as wide as max_model_len 4096 (the engine's width), context lengths drawn per
sequence as the reference workload's are at its midpoint. Every configuration is checked against the
fp32 reference of benchmarks/bench_attention.py before it is timed (an FP8 cache's values exactly, as
e4m3 with scales of 1.0), and replayed from a CUDA graph, as the engine runs decode. Bandwidth counts
the K/V bytes each kernel must read. Each shape's line starts with the configuration the engine runs
now (the table of nanovllm/kernels/tuning.py) for comparison.
"""

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

import nanovllm.kernels.paged_attention as pa
import nanovllm.kernels.tuning as tuning

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_MODEL_LEN = 16, 8, 128, 256, 4096
DTYPE = torch.bfloat16
# (batch, low, high): contexts uniform in [low, high] per sequence.
SHAPES = [
    (256, 200, 1600),
    (128, 400, 1800),
    (64, 600, 2000),
    (32, 800, 2000),
    (8, 1000, 2048),
    (1, 1500, 2048),
]
KERNEL_GRID = {
    "DECODE_TILE_N": (32, 64, 128, 256),
    "DECODE_NUM_WARPS": (2, 4, 8),
    "DECODE_NUM_STAGES": (2, 3, 4),
    "DECODE_HEADS_FIRST": (False, True),  # the launch order (see paged_attention.py)
}
SPLIT_GRID = {"DECODE_PROGRAMS_PER_SM": (1, 2, 4, 8, 16), "DECODE_MIN_TOKENS_PER_SPLIT": (64, 128, 256, 512)}


def make_case(batch: int, low: int, high: int, rng: random.Random, cache_dtype: torch.dtype) -> dict:
    width = MAX_MODEL_LEN // BLOCK_SIZE
    num_blocks = batch * width + 1
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE).to(cache_dtype)  # e4m3: scales of 1.0
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE).to(cache_dtype)
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    tables = torch.tensor(ids[: batch * width], dtype=torch.int32, device="cuda").view(batch, width)
    lens = [rng.randint(low, high) for _ in range(batch)]
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    context = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return {"q": q, "k": k_cache, "v": v_cache, "tables": tables, "context": context, "lens": lens}


def reference(case: dict, rows: int) -> torch.Tensor:
    outs = []
    group = NUM_HEADS // NUM_KV_HEADS
    for i in range(rows):
        n = case["lens"][i]
        blocks = case["tables"][i, : (n + BLOCK_SIZE - 1) // BLOCK_SIZE].long()
        k = case["k"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(group, 1)
        v = case["v"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", case["q"][i].float(), k) * HEAD_DIM**-0.5
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


def time_case(case: dict) -> tuple[float, float]:
    """(median microseconds from a CUDA graph, max abs error on the first rows)."""
    scale = HEAD_DIM**-0.5

    def call():
        return pa.decode_attention(case["q"], case["k"], case["v"], case["tables"], case["context"], scale)

    out = call()
    rows = min(4, out.shape[0])
    err = (out[:rows].float() - reference(case, rows)).abs().max().item()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()
        with torch.cuda.graph(graph, stream=stream):
            call()
    torch.cuda.synchronize()
    import triton

    us = triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3
    return us, err


def kv_bytes(case: dict) -> int:
    return sum(case["lens"]) * NUM_KV_HEADS * HEAD_DIM * 2 * case["k"].element_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="fewer kernel configurations (a smoke run)")
    p.add_argument(
        "--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="the cache's dtype (auto: bf16)"
    )
    p.add_argument("--kernel-only", action="store_true", help="skip the split-count sweep (stage 2)")
    args = p.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    rng = random.Random(0)
    cases = {shape: make_case(*shape, rng, cache_dtype) for shape in SHAPES}
    defaults = {name: getattr(pa, name) for name in (*KERNEL_GRID, *SPLIT_GRID)}
    grid = KERNEL_GRID if not args.quick else {k: v[:2] for k, v in KERNEL_GRID.items()}
    results: dict = {"defaults": defaults, "kv_cache_dtype": str(cache_dtype), "shapes": {}}
    table = {shape: time_case(case)[0] for shape, case in cases.items()}  # the configuration the engine runs
    tuning.DECODE_CONFIGS = {}  # sweep from the module defaults, not the table measured earlier
    for shape, case in cases.items():
        gbytes = kv_bytes(case)
        rows = []
        for values in itertools.product(*grid.values()):
            cfg = dict(zip(grid, values))
            for name, value in {**defaults, **cfg}.items():
                setattr(pa, name, value)
            try:
                us, err = time_case(case)
            except Exception as exc:  # noqa: BLE001 - an out-of-resources config is a result, not a crash
                rows.append({**cfg, "error": type(exc).__name__})
                continue
            rows.append({**cfg, "us": us, "tb_s": gbytes / us / 1e6, "err": err})
        ok = [r for r in rows if "us" in r and r["err"] < 2e-2]
        if not ok:
            print(f"{shape}: no configuration ran correctly: {rows[:3]}", flush=True)
            continue
        best = min(ok, key=lambda r: r["us"])
        default_row = next((r for r in ok if all(r[k] == defaults[k] for k in grid)), None)
        split_rows = []
        kernel = {k: best[k] for k in grid}
        for values in itertools.product(*SPLIT_GRID.values()) if not args.kernel_only else ():
            cfg = dict(zip(SPLIT_GRID, values))
            for name, value in {**defaults, **kernel, **cfg}.items():
                setattr(pa, name, value)
            us, err = time_case(case)
            split_rows.append({**cfg, "us": us, "tb_s": gbytes / us / 1e6, "err": err})
        best_split = min(split_rows, key=lambda r: r["us"]) if split_rows else best
        key = f"{shape[0]}x[{shape[1]},{shape[2]}]"
        results["shapes"][key] = {
            "table_us": table[shape],
            "kernel_sweep": rows,
            "split_sweep": split_rows,
            "best_kernel": best,
            "best_split": best_split,
            "default": default_row,
        }
        d = default_row["us"] if default_row else float("nan")
        print(
            f"{key:>18}: table {table[shape]:8.1f} us ({gbytes / table[shape] / 1e6:.2f} TB/s) | "
            f"default {d:8.1f} us | best kernel {kernel} {best['us']:8.1f} us "
            f"({best['tb_s']:.2f} TB/s) | + split {dict((k, best_split.get(k)) for k in SPLIT_GRID)} "
            f"{best_split['us']:8.1f} us ({best_split['tb_s']:.2f} TB/s)",
            flush=True,
        )
    for name, value in defaults.items():
        setattr(pa, name, value)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
