"""The fused MoE layer alone (router softmax/top-k + Triton experts) at decode and prefill token counts,
for Qwen3-30B-A3B's shape (hidden 2048, 128 experts of width 768, top-8, bf16), against what it must move
and compute, and against the plain PyTorch path.

Floor per call: the bytes of the experts the batch really activates (counted from its routing: gate, up
and down of each, 3 * 2048 * 768 * 2 bytes) plus the activations the kernels read and write, over the
device's copy bandwidth; and 2 * T * top_k * 3 * H * I FLOPs at the nominal bf16 matmul rate. The Triton
layer is timed as the engine's decode runs it (one CUDA graph replay per call, so launch gaps do not
count); the PyTorch path eagerly (it reads its routing on the host). `--sweep` also times other tile
configurations per token count and prints the best, for `nanovllm/kernels/fused_moe.py`'s GEMM_CONFIGS.
"""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
from nanovllm.kernels.fused_moe import fused_experts, gemm_config  # noqa: E402
from nanovllm.layers.fused_moe import FusedMoE, fused_moe_reference, route  # noqa: E402

# Nominal dense bf16 matmul rate of the H200 (the device docs; KERNELS.md), for the compute floor.
MATMUL_TFLOPS = 790.0
DEFAULT_TOKENS = "1,16,64,256,1024,4096,16384"
# Candidate tile configurations for --sweep (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
SWEEP = [
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    for m, n, k, w, s in itertools.product((16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (3,))
    if not (m == 64 and n == 32) and not (w == 8 and m * n < 32 * 128)
]


def time_cuda(fn, repeats: int, graph: bool) -> float:
    """Median seconds of one call (one CUDA graph replay when `graph`)."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    else:
        call = fn
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768, help="expert width (per GPU: divide by TP)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP tile configurations")
    p.add_argument("--reference-max-tokens", type=int, default=4096, help="PyTorch path only up to this T")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k
    bandwidth = bench.copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bench.human(bandwidth, 'B/s')}")
    print(f"shape: hidden {h}, {e} experts of width {i}, top-{k}, {args.dtype}")
    torch.manual_seed(0)
    with torch.device(device):
        layer = FusedMoE(e, k, h, i, renormalize=True)
        layer.w13_weight.data.normal_(0, 0.02)
        layer.w2_weight.data.normal_(0, 0.02)
        layer = layer.to(dtype)
        router = torch.randn(e, h, dtype=dtype) * 0.02
    expert_bytes = 3 * h * i * elem
    rows = []
    header = (
        f"{'T':>6} {'active':>6} {'triton us':>10} {'floor us':>9} {'of BW':>6} {'TFLOP/s':>8} "
        f"{'of peak':>7} {'torch us':>10} {'speed-up':>8} {'max err':>8}"
    )
    print(header)
    for t in [int(x) for x in args.tokens.split(",")]:
        x = torch.randn(t, h, device=device, dtype=dtype)
        logits = x @ router.T  # [T, E]
        weights, ids = route(logits, k, True)
        active = ids.unique().numel()
        moved = active * expert_bytes + elem * (2 * t * h + 2 * t * k * i + 2 * t * k * h)
        flop = 2 * t * k * 3 * h * i
        floor_s = max(moved / bandwidth, flop / (MATMUL_TFLOPS * 1e12))
        triton_s = time_cuda(lambda x=x, logits=logits: layer(x, logits), args.repeats, graph=True)
        torch_s = None
        err = None
        if t <= args.reference_max_tokens:
            ref = fused_moe_reference(x, layer.w13_weight, layer.w2_weight, weights, ids)
            out = layer(x, logits)
            err = (out.float() - ref.float()).abs().max().item()
            torch_s = time_cuda(
                lambda x=x, w=weights, d=ids: fused_moe_reference(x, layer.w13_weight, layer.w2_weight, w, d),
                max(3, args.repeats // 10),
                graph=False,
            )
        row = {
            "tokens": t,
            "active_experts": active,
            "bytes": moved,
            "flop": flop,
            "triton_s": triton_s,
            "floor_s": floor_s,
            "fraction_of_floor": floor_s / triton_s,
            "tflops": flop / triton_s / 1e12,
            "torch_s": torch_s,
            "max_abs_err_vs_torch": err,
            "config": gemm_config(t, k, e, dtype),
        }
        rows.append(row)
        torch_us = f"{torch_s * 1e6:10.1f}" if torch_s else f"{'-':>10}"
        speedup = f"{torch_s / triton_s:8.1f}" if torch_s else f"{'-':>8}"
        err_s = f"{err:8.1e}" if err is not None else f"{'-':>8}"
        print(
            f"{t:6d} {active:6d} {triton_s * 1e6:10.1f} {floor_s * 1e6:9.1f} {floor_s / triton_s:6.0%} "
            f"{row['tflops']:8.1f} {row['tflops'] / MATMUL_TFLOPS:7.1%} {torch_us} {speedup} {err_s}"
        )
        if args.sweep:
            best = None
            for cfg in SWEEP:
                try:
                    s = time_cuda(
                        lambda x=x, w=weights, d=ids, c=cfg: fused_experts(
                            x, layer.w13_weight, layer.w2_weight, w, d, config=c
                        ),
                        max(5, args.repeats // 5),
                        graph=True,
                    )
                except Exception as exc:  # a configuration that does not fit (shared memory): skip it
                    print(f"    skip {cfg}: {type(exc).__name__}")
                    continue
                if best is None or s < best[0]:
                    best = (s, cfg)
            default_s = time_cuda(
                lambda x=x, w=weights, d=ids: fused_experts(x, layer.w13_weight, layer.w2_weight, w, d),
                max(5, args.repeats // 5),
                graph=True,
            )
            row["sweep_best"] = {"seconds": best[0], "config": best[1], "default_seconds": default_s}
            print(f"    sweep: best {best[0] * 1e6:.1f} us with {best[1]} (default {default_s * 1e6:.1f} us)")
    decode = [r for r in rows if r["tokens"] <= 256]
    print(
        "summary: decode (T<=256) "
        + ", ".join(f"T={r['tokens']} {r['fraction_of_floor']:.0%}" for r in decode)
        + " of floor; prefill "
        + ", ".join(f"T={r['tokens']} {r['tflops']:.0f} TFLOP/s" for r in rows if r["tokens"] > 256)
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
