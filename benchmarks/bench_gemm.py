"""Small-batch GEMMs on the GPU: torch's F.linear (cuBLAS) against nanovllm.kernels.skinny_gemm.

Usage: PYTHONPATH=. python3 benchmarks/bench_gemm.py [--sweep] [--json PATH]

Shapes are the four projections of a Qwen3-0.6B and a Qwen3-8B decoder layer, bf16, at 1..16 rows, each
replayed from a CUDA graph of REPEATS calls back to back (as decode runs them), each call with its own copy
of the weight so that none is read from L2, weight bytes over time as TB/s. With
--sweep the skinny kernel's tunables (BLOCK_N, BLOCK_K, NUM_STAGES, NUM_WARPS, PROGRAMS_PER_SM) are swept
and the best configuration per shape printed. Each result is checked against F.linear first.
(A SwiGLU folded into the down projection's loads, timed here on 2026-12-02, ran at 0.83x the two launches
at 0.6B shapes and 0.32x at 8B, and was removed: benchmarks/RESULTS.md.)
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import nanovllm.kernels.skinny_gemm as sg

SHAPES = {  # name: (in, out)
    "0.6B qkv": (1024, 4096),
    "0.6B o": (2048, 1024),
    "0.6B gate_up": (1024, 6144),
    "0.6B down": (3072, 1024),
    "8B qkv": (4096, 6144),
    "8B o": (4096, 4096),
    "8B gate_up": (4096, 24576),
    "8B down": (12288, 4096),
}
ROWS = (1, 2, 4, 8, 16)
SWEEP = {
    "BLOCK_N": (16, 32, 64),
    "BLOCK_K": (128, 256),
    "NUM_STAGES": (3, 5),
    "PROGRAMS_PER_SM": (2, 4),
}
SWEEP_ROWS = (1, 4, 16)  # rows swept (the others are timed at the defaults only)


REPEATS = 20  # calls captured in one graph: a replay's fixed cost (several us) would swamp one small GEMM


def graph_time(fn, weights) -> float:
    """Microseconds per call of fn(w), from one CUDA graph calling it once per weight copy."""
    fn(weights[0])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(weights[0])
        with torch.cuda.graph(g, stream=s):
            for w in weights:
                fn(w)
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median") * 1e3 / len(weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="sweep the skinny kernel's tunables")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.manual_seed(0)
    defaults = {name: getattr(sg, name) for name in SWEEP}
    rows_out = []
    print(
        f"{'shape':>14} {'M':>3} {'cuBLAS us':>10} {'TB/s':>6} {'skinny us':>10} {'TB/s':>6} {'speedup':>8}"
    )
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = [w] + [w.clone() for _ in range(REPEATS - 1)]
        nbytes = w.numel() * w.element_size()
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            got = sg.skinny_gemm(x, w)
            err = (got.float() - ref.float()).abs().max().item()
            if err > 2e-2 * ref.float().abs().max().item():
                raise SystemExit(f"{name} M={m}: skinny_gemm differs from F.linear by {err}")
            t_cublas = graph_time(lambda w, x=x: F.linear(x, w), weights)
            t_skinny = graph_time(lambda w, x=x: sg.skinny_gemm(x, w), weights)
            row = {"shape": name, "m": m, "cublas_us": t_cublas, "skinny_us": t_skinny, "bytes": nbytes}
            if args.sweep and m in SWEEP_ROWS:
                best = (t_skinny, dict(defaults))
                for values in itertools.product(*SWEEP.values()):
                    cfg = dict(zip(SWEEP, values))
                    for key, value in cfg.items():
                        setattr(sg, key, value)
                    try:
                        t = graph_time(lambda w, x=x: sg.skinny_gemm(x, w), weights)
                    except Exception:  # noqa: BLE001 - out of resources: skip the configuration
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                for key, value in defaults.items():
                    setattr(sg, key, value)
                row["best_us"], row["best_config"] = best
            rows_out.append(row)
            extra = f"  best {row['best_us']:.1f} us {row['best_config']}" if "best_us" in row else ""
            print(
                f"{name:>14} {m:>3} {t_cublas:10.1f} {nbytes / t_cublas / 1e6:6.2f} {t_skinny:10.1f} "
                f"{nbytes / t_skinny / 1e6:6.2f} {t_cublas / t_skinny:7.2f}x{extra}",
                flush=True,
            )
        del weights
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"defaults": defaults, "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
