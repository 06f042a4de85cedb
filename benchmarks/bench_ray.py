"""What the Ray path costs: the same `generate` call on a plain engine and through Ray replicas
(`LLM(model, data_parallel_size=N)`), same model, prompts and sampling parameters.

    python benchmarks/bench_ray.py                        # tiny random model on CPU, 1 thread per engine
    python benchmarks/bench_ray.py --replicas 1 2 --num-prompts 128
    python benchmarks/bench_ray.py --model qwen3-0.6b-random --device cuda --num-prompts 256 \
        --max-input-len 1024 --max-output-len 1024         # one GPU: plain against one Ray replica

`--replicas 1` measures the overhead alone: one replica, so the engine work is the same as the plain
engine's and the difference is the driver's checks, the transfers and the result stream. More replicas
add engines (on a CPU machine each gets its own cores: `--threads` per engine, Ray's CPUs per replica).
Every run is checked against the plain engine's tokens (greedy, EOS ignored). Prints one line per run.
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.distributed import cleanup_dist_env_and_memory  # noqa: E402
from nanovllm.distributed.data_parallel import DataParallelLLM  # noqa: E402
from nanovllm.utils.builtin_model import BUILTIN_MODELS, get_builtin_model  # noqa: E402


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(vocab_size) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
        for _ in range(args.num_prompts)
    ]
    params = [
        SamplingParams(
            temperature=0.0, ignore_eos=True, max_tokens=rng.randint(args.min_output_len, args.max_output_len)
        )
        for _ in range(args.num_prompts)
    ]
    return prompts, params


def timed(llm, prompts, params, repeats: int) -> tuple[float, list]:
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    best, outs = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best, outs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-qwen3", help="a built-in model name or a model directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="data_parallel_size values")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-input-len", type=int, default=16)
    parser.add_argument("--max-input-len", type=int, default=128)
    parser.add_argument("--min-output-len", type=int, default=32)
    parser.add_argument("--max-output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (and Ray CPUs) per engine")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine (the best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    import ray

    model = get_builtin_model(args.model) if args.model in BUILTIN_MODELS else args.model
    engine = dict(device=args.device, max_model_len=args.max_input_len + args.max_output_len + 16)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        engine["num_kvcache_blocks"] = 2 * args.num_prompts  # 256-token blocks: more than the batch needs
    if not ray.is_initialized():
        cpus = max(args.replicas) * args.threads if args.device == "cpu" else None
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    plain = LLM(model, **engine)
    prompts, params = workload(args, plain.config.hf_config.vocab_size)
    num_tokens = sum(p.max_tokens for p in params)
    base_s, ref = timed(plain, prompts, params, args.repeats)
    plain.exit()
    cleanup_dist_env_and_memory()  # free cached GPU memory before a replica sizes its KV cache
    rows = [dict(engine="plain", replicas=0, seconds=base_s, tok_per_s=num_tokens / base_s)]
    print(f"plain engine:        {num_tokens} tokens in {base_s:.3f} s = {num_tokens / base_s:,.0f} tok/s")
    for n in args.replicas:
        t = time.perf_counter()
        # DataParallelLLM directly: LLM(data_parallel_size=1) would be a plain engine.
        llm = DataParallelLLM(model, data_parallel_size=n, **engine)
        start_s = time.perf_counter() - t
        secs, outs = timed(llm, prompts, params, args.repeats)
        llm.exit()
        same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs, ref))
        if not same:
            raise SystemExit(f"data_parallel_size={n}: tokens differ from the plain engine's")
        rows.append(
            dict(engine="ray", replicas=n, seconds=secs, tok_per_s=num_tokens / secs, start_s=start_s)
        )
        print(
            f"ray, {n} replica(s):   {num_tokens} tokens in {secs:.3f} s = {num_tokens / secs:,.0f} tok/s "
            f"({(secs / base_s - 1) * 100:+.1f}% time vs plain; start-up {start_s:.1f} s; tokens equal)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), num_tokens=num_tokens, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
