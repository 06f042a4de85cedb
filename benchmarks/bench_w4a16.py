"""Benchmark the Triton W4A16 GEMM on the GPU: Qwen3-8B layer shapes, decode (M = 1..256) and prefill,
against bf16 F.linear, with the bandwidth of the 4-bit bytes against the device copy bandwidth.

Usage: PYTHONPATH=. python3 benchmarks/bench_w4a16.py [--json PATH] [--sweep]

From DEQUANT_MIN_M rows on the default path dequantizes and calls cuBLAS; the last column then times the
tiled kernel at its default configuration.

Weights are AWQ-like (group 128, zero points), bf16 activations. Every shape is checked against
dequantize-then-matmul before it is timed. Times are medians of do_bench; decode launches (split-K plus
the reduction) are replayed from a CUDA graph, as the engine runs them. The bytes a launch must move:
qweight (K x N / 2) + scales (2 B per group and column) + zeros (0.5 B per group and column) + x and y.
`--sweep` times a grid of launch configurations at two shapes (M 1, 4, 16 and 2048) and prints the best (the
numbers to put into the tunables at the top of nanovllm/kernels/w4a16.py).
"""

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton

from nanovllm.kernels.w4a16 import (
    DECODE_MAX_M,
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    W4A16Config,
    default_config,
    w4a16_matmul,
)
from nanovllm.quantization.int4_utils import dequantize_int4, pack_int4

# Qwen3-8B: hidden 4096, intermediate 12288, 32 query heads and 8 KV heads of 128.
SHAPES = {  # name: (K, N)
    "qkv 4096x6144": (4096, 6144),
    "o 4096x4096": (4096, 4096),
    "gate_up 4096x24576": (4096, 24576),
    "4096x12288": (4096, 12288),
    "down 12288x4096": (12288, 4096),
}
DECODE_M = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PREFILL_M = [1024, 4096]
GROUP_SIZE = 128
DTYPE = torch.bfloat16
COPY_BYTES = 1 << 30
WARMUP_MS, REP_MS = 10, 100
SWEEP_SHAPES = ["4096x12288", "down 12288x4096"]
SWEEP_M = [1, 4, 16]
SWEEP_PREFILL_M = 2048
# Decode batches above DECODE_MAX_M (the engine dequantizes the weights for cuBLAS there) up to this
# many rows also sweep the split-K decode launch.
MID_MAX_M = 256
SWEEP_REP_MS = 25


@dataclass
class Row:
    shape: str
    m: int
    w4_us: float
    bf16_us: float
    speedup: float
    w4_tbps: float  # bytes a 4-bit launch must move / its time
    frac_of_copy: float
    w4_tflops: float
    config: str
    tiled_us: float | None  # prefill rows: the tiled kernel, against the default dequantize + cuBLAS


def bench(fn: Callable[[], object], rep_ms: int = REP_MS) -> float:
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="median") * 1e3


def bench_graph(fn: Callable[[], object], rep_ms: int = REP_MS) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, rep_ms)


def copy_tbps() -> float:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (t * 1e-6) / 1e12


def make_layer(k: int, n: int, gen: torch.Generator):
    groups = k // GROUP_SIZE
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda", dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, n), generator=gen, device="cuda", dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen, device="cuda") * 0.02 + 0.001).half()
    qweight, qzeros = pack_int4(q, 0), pack_int4(zeros, 1)
    weight = dequantize_int4(qweight, qzeros, scales, 0).to(DTYPE)  # [N, K]
    return qweight, qzeros, scales, weight


def w4_bytes(m: int, k: int, n: int) -> int:
    groups = k // GROUP_SIZE
    return k * n // 2 + groups * n * 2 + groups * n // 2 + (m * k + m * n) * DTYPE.itemsize


def run_shape(name: str, m: int, layer, copy: float, gen: torch.Generator) -> Row:
    qweight, qzeros, scales, weight = layer
    n, k = weight.shape
    x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
    got = w4a16_matmul(x, qweight, qzeros, scales, GROUP_SIZE, 0)
    want = x.float() @ weight.float().t()
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    if err > 2e-2:
        raise RuntimeError(f"{name} m={m}: relative error {err:.2e} against dequantize-then-matmul")
    timer = bench_graph if m <= 256 else bench
    t4 = timer(lambda: w4a16_matmul(x, qweight, qzeros, scales, GROUP_SIZE, 0))
    t16 = timer(lambda: F.linear(x, weight))
    tbps = w4_bytes(m, k, n) / (t4 * 1e-6) / 1e12
    cfg = default_config(m, n, k, DTYPE, x.device, GROUP_SIZE)
    tiled = None
    if m >= DEQUANT_MIN_M:
        tiled = timer(lambda: w4a16_matmul(x, qweight, qzeros, scales, GROUP_SIZE, 0, config=cfg))
    tflops = 2 * m * k * n / (t4 * 1e-6) / 1e12
    return Row(name, m, t4, t16, t16 / t4, tbps, tbps / copy, tflops, str(asdict(cfg)), tiled)


def gemv_configs(m: int) -> list[W4A16Config]:
    """The CUDA-core GEMV's split-K grid at m rows (1, 2 or 4 a program): Triton's pipelining (2 stages)
    or none, and without pipelining the next tile's loads issued first (`prefetch`)."""
    rows = 1 if m == 1 else (2 if m == 2 else 4)
    loops = ((1, False), (2, False), (1, True))
    grid = itertools.product((128, 256, 512), (32, 64, 128), (1, 4, 8, 16), loops)
    return [
        W4A16Config(rows, bn, bk, split, 4, stages, gemv=True, prefetch=prefetch)
        for bn, bk, split, (stages, prefetch) in grid
    ]


def sweep_configs(m: int, k: int, families: str = "all") -> list[W4A16Config]:
    """Decode: split-K grids, the GEMV (up to GEMV_MAX_M rows), on CUDA cores in the tiled kernel (one
    row) and with tl.dot (BLOCK_M 16 or more, the weight tile as the first operand, the packed
    dequantization; the unpacked one at DECODE_BLOCK_N x DECODE_BLOCK_K for comparison); prefill: tile
    shapes without a split, and up to MID_MAX_M rows the decode launch too (all rows one tile, the
    weight tile first, split-K), against which the default there (the weights dequantized for cuBLAS)
    is the table's w4a16 column. `families` "gemv": the GEMV's grid only."""
    if m > DECODE_MAX_M:
        grid = itertools.product((64, 128), (128, 256), (64, 128), (4, 8))
        configs = [W4A16Config(bm, bn, bk, 1, warps, 3) for bm, bn, bk, warps in grid]
        if m <= MID_MAX_M:
            block_m = triton.next_power_of_2(m)
            grid = itertools.product((64, 128), (64, 128), (1, 2, 4, 8), (2, 3), (4, 8))
            for bn, bk, split, stages, warps in grid:
                configs.append(W4A16Config(block_m, bn, bk, split, warps, stages, swap_ab=True))
        return [c for c in configs if k // c.split_k >= c.block_k]
    configs = gemv_configs(m) if m <= GEMV_MAX_M else []
    if families == "gemv":
        return [c for c in configs if k // c.split_k >= c.block_k]
    block_m = max(16, triton.next_power_of_2(m))
    if m == 1:
        for bn, bk, split in itertools.product((64, 128), (64, 128), (4, 8, 16)):
            configs.append(W4A16Config(1, bn, bk, split, 4, 4))
    for split in (2, 4, 8):
        configs.append(W4A16Config(block_m, 64, 128, split, 4, 4, swap_ab=True, packed=False))
    for bn, bk, split, stages in itertools.product((64, 128), (64, 128, 256), (1, 2, 4, 8, 16), (2, 3, 4)):
        configs.append(W4A16Config(block_m, bn, bk, split, 4, stages, swap_ab=True, packed=True))
    return [c for c in configs if k // c.split_k >= c.block_k]


def sweep(copy: float, gen: torch.Generator, rows: list[int], families: str = "all") -> list[dict]:
    """Time a grid of configurations at the decode shapes; print the best few per shape."""
    results = []
    for name in SWEEP_SHAPES:
        k, n = SHAPES[name]
        qweight, qzeros, scales, weight = make_layer(k, n, gen)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
            want = x.float() @ weight.float().t()
            timings = []
            for cfg in sweep_configs(m, k, families):

                def launch(cfg=cfg, x=x, layer=(qweight, qzeros, scales)):
                    return w4a16_matmul(x, *layer, GROUP_SIZE, 0, config=cfg)

                try:
                    err = ((launch().float() - want).abs().max() / want.abs().max()).item()
                    if err > 2e-2:  # checked before it is timed, as every default launch
                        print(f"  WRONG (relative error {err:.2e}) {cfg}")
                        continue
                    t = bench_graph(launch, SWEEP_REP_MS)
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the config
                    print(f"  skip {cfg}: {type(e).__name__}")
                    continue
                timings.append((t, cfg))
            timings.sort(key=lambda r: r[0])
            print(f"sweep {name} m={m}: best of {len(timings)}")
            families = {
                "gemv": lambda c: c.gemv,
                "cuda cores": lambda c: c.block_m == 1 and not c.gemv,
                "unpacked": lambda c: c.block_m > 1 and not c.packed and not c.gemv,
            }
            shown = timings[:5] + [next((r for r in timings if f(r[1])), None) for f in families.values()]
            for i, row in enumerate(shown):
                if row is None or (i >= 5 and row in timings[:5]):
                    continue
                t, cfg = row
                tbps = w4_bytes(m, k, n) / (t * 1e-6) / 1e12
                label = "" if i < 5 else f" (best {list(families)[i - 5]})"
                print(f"  {t:8.1f} us {tbps:5.2f} TB/s ({tbps / copy:4.0%} of copy)  {cfg}{label}")
            for t, cfg in timings:
                tbps = w4_bytes(m, k, n) / (t * 1e-6) / 1e12
                results.append({"shape": name, "m": m, "us": t, "tbps": tbps, "config": asdict(cfg)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    parser.add_argument(
        "--sweep-m", default=",".join(map(str, SWEEP_M + [SWEEP_PREFILL_M])), help="rows the sweep times"
    )
    parser.add_argument("--sweep-family", default="all", choices=("all", "gemv"), help="configurations swept")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_w4a16.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy = copy_tbps()
    print(f"device copy: {copy:.2f} TB/s ({torch.cuda.get_device_name()})")
    rows = []
    print(
        f"{'shape':>20} {'M':>5} {'w4a16 us':>9} {'bf16 us':>9} {'speedup':>8} {'w4 TB/s':>8} {'of copy':>8} "
        f"{'TFLOP/s':>8} {'tiled us':>9}"
    )
    for name, (k, n) in SHAPES.items():
        layer = make_layer(k, n, gen)
        for m in DECODE_M + PREFILL_M:
            row = run_shape(name, m, layer, copy, gen)
            rows.append(row)
            print(
                f"{name:>20} {m:>5} {row.w4_us:9.1f} {row.bf16_us:9.1f} {row.speedup:7.2f}x "
                f"{row.w4_tbps:8.2f} {row.frac_of_copy:7.0%} {row.w4_tflops:8.1f} "
                f"{row.tiled_us if row.tiled_us is not None else float('nan'):9.1f}"
            )
        del layer
    small = [r for r in rows if r.m <= 16 and r.shape in ("4096x12288", "down 12288x4096")]
    worst = min(small, key=lambda r: r.frac_of_copy)
    print(
        f"goal (>= 75% of copy at M 1-16, 4096x12288 and 12288x4096): worst {worst.frac_of_copy:.0%} "
        f"({worst.shape}, M={worst.m})"
    )
    sweep_rows = (
        sweep(copy, gen, [int(m) for m in args.sweep_m.split(",")], args.sweep_family) if args.sweep else []
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"copy_tbps": copy, "rows": [asdict(r) for r in rows], "sweep": sweep_rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
