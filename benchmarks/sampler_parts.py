"""Time each piece of the sampler on the GPU to find where the time goes, and sweep the truncation
kernel's tunables.

    PYTHONPATH=. python3 benchmarks/sampler_parts.py [--batch 256] [--vocab 151936] [--sweep]

A diagnostic companion to bench_sampler.py (which times the sampler as the engine calls it).
"""

import argparse
import itertools

import torch
import triton

from nanovllm.kernels import draw as D
from nanovllm.kernels import truncation as K
from nanovllm.layers import sampler as S


def timed(name: str, fn) -> float:
    us = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median") * 1000
    print(f"{name:<60} {us:9.1f} us", flush=True)
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--sweep", action="store_true", help="time the kernel's tunables too")
    args = parser.parse_args()
    dev = torch.device("cuda")
    b, v = args.batch, args.vocab
    logits = torch.randn(b, v, device=dev, dtype=torch.bfloat16) * 4
    temps = torch.full((b,), 0.6, device=dev)
    keys = torch.randint(0, 2**32, (b, 2), device=dev, dtype=torch.int64)
    off_k, off_p, off_min_p = (
        torch.full((b,), v, device=dev),
        torch.ones(b, device=dev),
        torch.zeros(b, device=dev),
    )
    top_k, top_p, min_p = (
        torch.full_like(off_k, 50),
        torch.full_like(off_p, 0.9),
        torch.full_like(off_min_p, 0.05),
    )
    rules = {
        "top-k 50": (top_k, off_p, off_min_p),
        "top-p 0.9": (off_k, top_p, off_min_p),
        "min-p 0.05": (off_k, off_p, min_p),
        "top-k 50 + top-p 0.9 + min-p 0.05": (top_k, top_p, min_p),
    }
    print(f"batch {b} x vocab {v}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    timed("argmax (all greedy)", lambda: logits.argmax(-1))
    timed(
        "sort bf16 stable (the sort path's first step)",
        lambda: logits.sort(dim=-1, descending=True, stable=True),
    )
    timed("topk 64 bf16", lambda: logits.topk(64, dim=-1))
    for name, (k, p, mp) in rules.items():
        timed(
            f"thresholds kernel: {name}",
            lambda k=k, p=p, mp=mp: K.truncation_thresholds(logits, temps, k, p, mp),
        )
    k, p, mp = rules["top-k 50 + top-p 0.9 + min-p 0.05"]
    timed(
        "thresholds by sort (reference_thresholds), all three",
        lambda: S.reference_thresholds(logits, temps, k, p, mp),
    )
    for rows in (1, 16):
        timed(
            f"thresholds kernel: all three, batch {rows}",
            lambda r=rows: K.truncation_thresholds(logits[:r], temps[:r], k[:r], p[:r], mp[:r]),
        )
    thresholds = K.truncation_thresholds(logits, temps, k, p, mp)
    compiled = torch.compile(S.reference_sample)  # the draw as one torch.compile'd graph (before 2026-11-25)
    timed("compiled torch draw, torch noise", lambda: compiled(logits, temps, None))
    timed("compiled torch draw, hashed noise, thresholds", lambda: compiled(logits, temps, keys, thresholds))
    timed("draw kernel, Philox noise", lambda: D.draw(logits, temps, None, None))
    timed("draw kernel, Philox noise, thresholds", lambda: D.draw(logits, temps, None, thresholds))
    timed("draw kernel, hashed noise, thresholds", lambda: D.draw(logits, temps, keys, thresholds))
    for rows in (1, 16):
        timed(
            f"draw kernel, Philox noise, batch {rows}",
            lambda r=rows: D.draw(logits[:r], temps[:r], None, None),
        )
    if args.sweep:
        default = (D.BLOCK, D.NUM_WARPS, D.TARGET_PROGRAMS)
        print("sweep draw: block, warps, target programs -> batch 256, batch 16, batch 1 (us)")
        for block, warps, target in itertools.product((512, 1024, 2048), (4, 8), (1024, 2048, 4096)):
            D.BLOCK, D.NUM_WARPS, D.TARGET_PROGRAMS = block, warps, target
            times = [
                triton.testing.do_bench(
                    lambda n=n: D.draw(logits[:n], temps[:n], None, None),
                    warmup=10,
                    rep=100,
                    return_mode="median",
                )
                * 1000
                for n in (b, 16, 1)
            ]
            print(
                f"sweep draw {block:5d} {warps:2d} {target:5d}  " + "  ".join(f"{t:8.1f}" for t in times),
                flush=True,
            )
        D.BLOCK, D.NUM_WARPS, D.TARGET_PROGRAMS = default
    if args.sweep:
        default = (K.CANDIDATES, K.BLOCK, K.NUM_WARPS)
        print("sweep: candidates, block, warps -> top-k, top-p, all three, all three at batch 16 (us)")
        for c, block, warps in itertools.product((4, 8), (2048, 4096, 8192), (8, 16, 32)):
            K.CANDIDATES, K.BLOCK, K.NUM_WARPS = c, block, warps
            times = [
                triton.testing.do_bench(
                    lambda r=r, n=n: K.truncation_thresholds(logits[:n], temps[:n], *(t[:n] for t in r)),
                    warmup=10,
                    rep=100,
                    return_mode="median",
                )
                * 1000
                for r, n in [
                    (rules["top-k 50"], b),
                    (rules["top-p 0.9"], b),
                    (rules["top-k 50 + top-p 0.9 + min-p 0.05"], b),
                    (rules["top-k 50 + top-p 0.9 + min-p 0.05"], 16),
                ]
            ]
            print(
                f"sweep {c:3d} {block:5d} {warps:2d}  " + "  ".join(f"{t:8.1f}" for t in times),
                flush=True,
            )
        K.CANDIDATES, K.BLOCK, K.NUM_WARPS = default


if __name__ == "__main__":
    main()
