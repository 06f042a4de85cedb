"""Time the sampler at the benchmark's shape (batch 256 x vocabulary 151,936) on the GPU.

    PYTHONPATH=. python3 benchmarks/bench_sampler.py [--batch 256] [--vocab 151936]

Rows: plain temperature (the bench.py path), with top-k/top-p/min-p (each alone and all three), with
per-request seeds (counter-based noise), and both; then the truncating case at batch 1 and 16.
Medians of triton.testing.do_bench, compiled as the engine compiles them.
"""

import argparse

import torch
import triton

from nanovllm.layers.sampler import Sampler, SamplingTensors
from nanovllm.utils.compile import enable_compilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--profile", action="store_true", help="print each case's top GPU kernels")
    args = parser.parse_args()
    enable_compilation()
    dev = torch.device("cuda")
    b, v = args.batch, args.vocab
    logits = torch.randn(b, v, device=dev, dtype=torch.bfloat16) * 4
    temps = torch.full((b,), 0.6, device=dev)
    keys = torch.randint(0, 2**32, (b, 2), device=dev, dtype=torch.int64)
    trunc = dict(
        top_k=torch.full((b,), 50, device=dev),
        top_p=torch.full((b,), 0.9, device=dev),
        min_p=torch.full((b,), 0.05, device=dev),
    )
    off = dict(
        top_k=torch.full((b,), v, device=dev),
        top_p=torch.ones(b, device=dev),
        min_p=torch.zeros(b, device=dev),
    )
    cases = {
        "temperature only": SamplingTensors(temps),
        "top-k 50": SamplingTensors(temps, **(off | {"top_k": trunc["top_k"]})),
        "top-p 0.9": SamplingTensors(temps, **(off | {"top_p": trunc["top_p"]})),
        "min-p 0.05": SamplingTensors(temps, **(off | {"min_p": trunc["min_p"]})),
        "top-k 50, top-p 0.9, min-p 0.05": SamplingTensors(temps, **trunc),
        "seeded (hashed noise)": SamplingTensors(temps, keys=keys),
        "seeded + truncation": SamplingTensors(temps, keys=keys, **trunc),
    }
    for n in (1, 16):
        cases[f"top-k/top-p/min-p at batch {n}"] = SamplingTensors(
            temps[:n], **{k: t[:n] for k, t in trunc.items()}
        )
    sampler = Sampler()
    rows = []
    for name, params in cases.items():
        ms = triton.testing.do_bench(
            lambda p=params: sampler(logits[: len(p.temperatures)], p),
            warmup=100,
            rep=500,
            return_mode="median",
        )
        rows.append((name, ms))
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    sampler(logits[: len(params.temperatures)], params)
                torch.cuda.synchronize()
            print(f"--- {name}: 3 calls")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    print(f"\nsampler, batch {b} x vocab {v}, {torch.cuda.get_device_name()}")
    for name, ms in rows:
        print(f"{name:<36} {ms * 1000:8.1f} us")


if __name__ == "__main__":
    main()
