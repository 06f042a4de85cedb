"""Single-stream latency: one request at a time, ms per output token against the weights-once floor.

Usage: PYTHONPATH=. python3 benchmarks/bench_latency.py [--model M] [--prompt-len 256] [--output-len 1024]
                                                        [--engine nanovllm|vllm] [--json PATH]

Both engines are timed the same way: generate() of one random-token prompt with max_tokens=1 (time to the
first token, which is the prefill) and with max_tokens=--output-len (ignore_eos), each the median of
--repeats runs after a warm-up; ms per token is (full - first) / (output_len - 1). At batch 1 a decode
step must read every weight once (plus a small KV cache), so weight bytes over the measured copy
bandwidth is the floor a step cannot beat.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402  (the repository root's bench.py: model lookup, bandwidth, versions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=bench.DEFAULT_MODEL, help=f"model directory or one of {bench.BUILTIN_MODELS}"
    )
    p.add_argument("--engine", choices=("nanovllm", "vllm"), default="nanovllm", help="engine to time")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=1024, help="output tokens (ignore_eos)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (the median is kept)")
    p.add_argument("--attention-backend", default="auto", help="nano-vllm's attention backend")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (nano-vllm)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def build(args: argparse.Namespace, path: str) -> tuple[Any, Any, int]:
    """(llm, SamplingParams class, bytes of the weights one step reads)."""
    max_len = args.prompt_len + args.output_len + 16
    if args.engine == "vllm":
        from vllm import LLM, SamplingParams

        dummy = bench.builtin_model.builtin_load_format(path) == "dummy"
        llm = LLM(
            path,
            max_model_len=max_len,
            enforce_eager=args.enforce_eager,
            max_num_seqs=8,
            **({"load_format": "dummy"} if dummy else {}),
        )
        weights = sum(p.numel() * p.element_size() for p in bench._vllm_model(llm).parameters())
        return llm, SamplingParams, weights
    from nanovllm import LLM, SamplingParams

    llm = LLM(
        path,
        max_model_len=max(4096, max_len),
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        device=args.device,
    )
    return llm, SamplingParams, bench.param_bytes(llm.model_runner.model)


def timed(llm: Any, params: Any, prompt: list[int], engine: str) -> float:
    bench._sync()
    start = time.perf_counter()
    if engine == "vllm":
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    else:
        llm.generate([prompt], params, use_tqdm=False)
    bench._sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output_len < 2:
        raise SystemExit("--output-len must be at least 2")
    path = bench.resolve_model(args.model)
    device = bench._device(args.device)
    bandwidth = bench.copy_bandwidth(device)
    llm, SamplingParams, weight_bytes = build(args, path)
    rng = random.Random(0)
    from transformers import AutoConfig

    high = min(AutoConfig.from_pretrained(path).vocab_size, bench.TOKEN_ID_HIGH)
    prompt = [rng.randrange(high) for _ in range(args.prompt_len)]
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    timed(llm, full, prompt, args.engine)  # warm-up (compiles, graphs, caches)
    ttft = statistics.median(timed(llm, first, prompt, args.engine) for _ in range(args.repeats))
    total = statistics.median(timed(llm, full, prompt, args.engine) for _ in range(args.repeats))
    ms_per_token = 1e3 * (total - ttft) / (args.output_len - 1)
    floor_ms = 1e3 * weight_bytes / bandwidth if bandwidth else None
    result = {
        "engine": args.engine,
        "model": path,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "ttft_ms": 1e3 * ttft,
        "total_s": total,
        "ms_per_token": ms_per_token,
        "weight_bytes": weight_bytes,
        "copy_bytes_per_s": bandwidth,
        "floor_ms_per_token": floor_ms,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git_commit": bench.git_commit(),
        "versions": bench.versions(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    floor = (
        f", floor {floor_ms:.3f} ms (weights once at copy bandwidth: {floor_ms / ms_per_token:.0%})"
        if floor_ms
        else ""
    )
    print(
        f"Latency {args.engine}: prompt {args.prompt_len}, output {args.output_len}: first token "
        f"{1e3 * ttft:.1f} ms, {ms_per_token:.3f} ms/token{floor}"
    )
    if args.engine == "nanovllm":
        llm.exit()


if __name__ == "__main__":
    main()
