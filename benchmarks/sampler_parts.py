"""Time each piece of the sampler on the GPU, compiled and eager, to find where the time goes.

    PYTHONPATH=. python3 benchmarks/sampler_parts.py [--batch 256] [--vocab 151936]

A diagnostic companion to bench_sampler.py (which times the sampler as the engine calls it).
"""

import argparse
import time

import torch
import triton

from nanovllm.layers import sampler as S


def timed(name: str, fn, rows: list) -> None:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")
    rows.append((name, ms * 1000, first))
    print(f"{name:<58} {ms * 1000:9.1f} us   (first call {first:6.2f} s)", flush=True)


def old_sample(logits, temperatures):  # the sampler of 2a73a59 (measured at 0.41 ms in the engine)
    logits = logits.float().div_(temperatures.unsqueeze(1))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1).clamp_(min=1e-10)
    return probs.div_(noise).argmax(dim=-1)


def gumbel_outside(logits, temperatures, noise):
    return (logits.float() / temperatures.clamp(min=1e-6).unsqueeze(1) - noise.log()).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args()
    dev = torch.device("cuda")
    b, v = args.batch, args.vocab
    logits = torch.randn(b, v, device=dev, dtype=torch.bfloat16) * 4
    temps = torch.full((b,), 0.6, device=dev)
    keys = torch.randint(0, 2**32, (b, 2), device=dev, dtype=torch.int64)
    top_k = torch.full((b,), 50, device=dev)
    top_p = torch.full((b,), 0.9, device=dev)
    min_p = torch.full((b,), 0.05, device=dev)
    ids = torch.arange(v, device=dev)
    rows: list = []
    print(f"batch {b} x vocab {v}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    timed("eager: logits.argmax (all greedy)", lambda: logits.argmax(-1), rows)
    timed("eager: logits.float()", lambda: logits.float(), rows)
    timed("eager: rand_like fp32", lambda: torch.rand(b, v, device=dev), rows)
    timed("eager: exponential_ fp32", lambda: torch.empty(b, v, device=dev).exponential_(), rows)
    timed("eager: hashed_uniform", lambda: S.hashed_uniform(keys, ids), rows)
    timed("eager: old sample (2a73a59)", lambda: old_sample(logits, temps), rows)
    timed("eager: new sample, torch noise", lambda: S.sample.fn(logits, temps, None), rows)
    timed("eager: new sample, hashed noise", lambda: S.sample.fn(logits, temps, keys), rows)
    noise = torch.empty(b, v, device=dev).exponential_()
    timed("eager: gumbel argmax, noise given", lambda: gumbel_outside(logits, temps, noise), rows)
    for mode in ("dynamic=True", "dynamic=None"):
        kw = {"dynamic": True} if mode == "dynamic=True" else {}
        torch._dynamo.reset()
        c_old = torch.compile(old_sample, **kw)
        c_new = torch.compile(S.sample.fn, **kw)
        c_gum = torch.compile(gumbel_outside, **kw)
        c_hash = torch.compile(S.hashed_uniform, **kw)
        timed(f"compiled {mode}: old sample", lambda f=c_old: f(logits, temps), rows)
        timed(f"compiled {mode}: new sample, torch noise", lambda f=c_new: f(logits, temps, None), rows)
        timed(f"compiled {mode}: new sample, hashed noise", lambda f=c_new: f(logits, temps, keys), rows)
        timed(f"compiled {mode}: gumbel argmax, noise given", lambda f=c_gum: f(logits, temps, noise), rows)
        timed(f"compiled {mode}: hashed_uniform", lambda f=c_hash: f(keys, ids), rows)
    # the truncating path, piece by piece
    timed("eager: sort bf16 stable", lambda: logits.sort(dim=-1, descending=True, stable=True), rows)
    timed("eager: sort bf16 unstable", lambda: logits.sort(-1, descending=True), rows)
    lf = logits.float()
    timed("eager: sort fp32 unstable", lambda: lf.sort(-1, descending=True), rows)
    timed("eager: topk 64 bf16", lambda: logits.topk(64, dim=-1), rows)
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    timed("eager: _sorted_probs", lambda: S._sorted_probs.fn(sorted_logits, temps, top_k), rows)
    probs = S._sorted_probs.fn(sorted_logits, temps, top_k)
    timed("eager: cumsum", lambda: probs.cumsum(-1), rows)
    cum = probs.cumsum(-1)
    timed(
        "eager: _draw_sorted torch noise",
        lambda: S._draw_sorted.fn(probs, cum, order, top_p, min_p, None),
        rows,
    )
    timed(
        "eager: _draw_sorted hashed", lambda: S._draw_sorted.fn(probs, cum, order, top_p, min_p, keys), rows
    )
    torch._dynamo.reset()
    c_sp = torch.compile(S._sorted_probs.fn, dynamic=True)
    c_ds = torch.compile(S._draw_sorted.fn, dynamic=True)
    timed("compiled: _sorted_probs", lambda: c_sp(sorted_logits, temps, top_k), rows)
    timed("compiled: _draw_sorted torch noise", lambda: c_ds(probs, cum, order, top_p, min_p, None), rows)
    timed("compiled: _draw_sorted hashed", lambda: c_ds(probs, cum, order, top_p, min_p, keys), rows)
    timed(
        "eager: whole truncated path",
        lambda: S.sample_truncated(logits, temps, keys, top_k, top_p, min_p),
        rows,
    )


if __name__ == "__main__":
    main()
