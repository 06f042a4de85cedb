"""Serving benchmark: an async load generator against any OpenAI-compatible server (nano-vllm's or
`vllm serve`), like vLLM's `vllm bench serve`.

Requests are streamed /v1/completions calls with random token-id prompts of the reference workload's
lengths (bench.py: prompt lengths randint(100, 1024) of ids randint(0, 10000), max_tokens
randint(100, 1024), temperature 0.6, ignore_eos), sent at `--request-rate` (Poisson arrivals; inf:
all at once) with at most `--max-concurrency` in flight. Reported: request and token throughput,
time to first token (TTFT), time per output token after the first (TPOT) and inter-token latency
(ITL, the gaps between streamed chunks, as vLLM's benchmark measures it), as mean / median / p99 in
milliseconds. A server may send several tokens in one chunk (vLLM and nano-vllm coalesce a stream's
tokens while its reader is behind): then ITL spans several tokens and is no longer a per-token figure
(TPOT still is), which "chunks per token" below 1 and the count of requests with such chunks show.

    python -m nanovllm.entrypoints.openai.api_server --model MODEL --port 8000 &
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --model MODEL \\
        --max-concurrency 16 --num-prompts 64 [--result-json results.jsonl --label nano-vllm]
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

# Bounds on one run, so a stuck server cannot hold the benchmark forever.
REQUEST_TIMEOUT_S = 1800.0


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    num_chunks: int = 0  # streamed chunks with a choice (ideally one per token or step)
    error: str = ""


def make_workload(
    num: int, seed: int, input_range: tuple[int, int], output_range: tuple[int, int], max_id: int = 10000
):
    """(prompt token ids, max_tokens) pairs: all prompts drawn first, then the lengths (as bench.py)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(*input_range))] for _ in range(num)]
    max_tokens = [rng.randint(*output_range) for _ in range(num)]
    return list(zip(prompts, max_tokens))


async def one_request(
    session, url: str, model: str, prompt: list[int], max_tokens: int, temperature: float, headers: dict
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False, prompt_len=len(prompt))
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                result.num_chunks += 1
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(args) -> dict:
    import aiohttp

    workload = make_workload(
        args.num_prompts,
        args.seed,
        tuple(args.input_len_range),
        tuple(args.output_len_range),
        args.max_token_id,
    )
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(workload))
    rng = random.Random(args.seed + 1)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def limited(prompt, max_tokens):
            async with limit:
                return await one_request(
                    session, url, args.model, prompt, max_tokens, args.temperature, headers
                )

        # One warm-up request (not timed): servers compile or capture graphs lazily.
        await one_request(session, url, args.model, workload[0][0][:16], 4, args.temperature, headers)
        start = time.perf_counter()
        tasks = []
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, results, duration)


def _ms_stats(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "mean": 1000 * statistics.fmean(values),
        "median": 1000 * statistics.median(values),
        "p99": 1000 * p99,
    }


def summarize(args, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    summary = {
        "label": args.label,
        "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "output_tokens": out_tokens,
        "chunks_per_output_token": sum(r.num_chunks for r in ok) / max(1, out_tokens),
        # Requests some of whose chunks carried several tokens (coalesced, or two steps read back at once).
        "multi_token_chunk_requests": sum(r.num_chunks < r.output_len for r in ok),
        "ttft_ms": _ms_stats([r.ttft for r in ok]),
        "tpot_ms": _ms_stats(tpot),
        "itl_ms": _ms_stats([g for r in ok for g in r.itl]),
    }
    return summary


def print_summary(s: dict) -> None:
    print(
        f"==== {s['label'] or 'serving'}: concurrency {s['max_concurrency'] or 'unbounded'}, "
        f"rate {s['request_rate']} req/s ===="
    )
    print(
        f"requests: {s['completed']} ok, {s['failed']} failed in {s['duration_s']:.2f} s"
        + (f" (first error: {s['first_error']})" if s["failed"] else "")
    )
    print(
        f"throughput: {s['request_throughput']:.2f} req/s, output {s['output_throughput']:.1f} tok/s, "
        f"total {s['total_token_throughput']:.1f} tok/s ({s['output_tokens']} output tokens, "
        f"{s['chunks_per_output_token']:.2f} chunks per token; {s['multi_token_chunk_requests']} of "
        f"{s['completed']} requests had chunks of several tokens)"
    )
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        v = s[name]
        print(
            f"{name[:-3].upper():5s} ms: mean {v['mean']:.2f}, median {v['median']:.2f}, p99 {v['p99']:.2f}"
            + (" (between chunks)" if name == "itl_ms" else "")
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server (default: %(default)s).")
    p.add_argument("--model", required=True, help="The model name the server serves.")
    p.add_argument("--api-key", default=None, help="Bearer token, when the server needs one.")
    p.add_argument("--num-prompts", type=int, default=256, help="Requests to send (default: %(default)s).")
    p.add_argument("--max-concurrency", type=int, default=0, help="Most requests in flight; 0: no limit.")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrival rate in requests/s (default: inf, all at once).",
    )
    p.add_argument(
        "--input-len-range",
        type=int,
        nargs=2,
        default=[100, 1024],
        metavar=("MIN", "MAX"),
        help="Prompt lengths in tokens (default: 100 1024, the reference workload's).",
    )
    p.add_argument(
        "--output-len-range",
        type=int,
        nargs=2,
        default=[100, 1024],
        metavar=("MIN", "MAX"),
        help="max_tokens per request (default: 100 1024).",
    )
    p.add_argument(
        "--max-token-id",
        type=int,
        default=10000,
        help="Prompt ids are drawn from [0, this] (default: %(default)s; a tiny model needs less).",
    )
    p.add_argument("--temperature", type=float, default=0.6, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="Workload seed (default: %(default)s).")
    p.add_argument("--label", default="", help="A name for this run in the output.")
    p.add_argument("--result-json", default=None, help="Append the summary as one JSON line to this file.")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.max_concurrency < 0:
        p.error("--num-prompts must be >= 1 and --max-concurrency >= 0")
    summary = asyncio.run(run(args))
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    if summary["failed"]:
        print(f"{summary['failed']} requests failed", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
