"""Long-context requests on a random-weight Qwen3-0.6B-shaped model with yarn (factor 4 over 32,768: a
131,072-token limit), each figure beside its limit measured in the same call.

Parts (all by default; --parts picks):
- `kernel`: the decode attention kernel alone (one layer's call, graph-replayed) at batch 1 x 32K,
  batch 1 x 128K and batch 16 x 32K cached tokens: KV bytes read over time, against the device copy
  bandwidth;
- `long`: one 131,072 - 256 token prompt prefilled in chunks of --max-num-batched-tokens (prefill seconds,
  tokens/s and TFLOP/s against a bf16 matmul measured here), its 256 output tokens decoded (ms/token
  against the floor: weights + every cached token read per step over the copy bandwidth), the same
  prompt again with a new last block (prefix cache hit: only the tail is computed), and peak memory;
- `batch`: 16 requests of 32,768-token prompts + 512 outputs: output tokens/s against the limit (prefill
  FLOPs at the matmul rate plus decode bytes at the copy bandwidth), split into prefill (16 other prompts
  of that length prefilled alone first) and decode (the rest);
- `window`: a sliding-window variant (every layer windowed at 4,096) decoding one long sequence: KV
  blocks held against its length, beside the same model without the window.
`--engine vllm` runs `long` and `batch` through vLLM instead (the bundle in ../shared/vllm-bundle/).
Runs on a CPU with --tiny (a tiny model, short lengths: a smoke test of the script, no figures).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanovllm.utils import builtin_model  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e4}
WINDOW = 4096
TOKEN_ID_HIGH = 10000


def build_model(out_dir: str, tiny: bool, window: int | None = None) -> str:
    """config.json + tokenizer (no weights: engines load with load_format="dummy")."""
    if tiny:
        overrides = builtin_model.TINY_QWEN3 | dict(max_position_embeddings=1024, rope_parameters=TINY_YARN)
        dtype = torch.float32
    else:
        overrides = builtin_model.QWEN3_0_6B | dict(rope_parameters=YARN)
        dtype = torch.bfloat16
    overrides = {k: v for k, v in overrides.items() if k != "rope_theta"}
    if window is not None:
        n = overrides["num_hidden_layers"]
        overrides |= dict(use_sliding_window=True, sliding_window=window, max_window_layers=0)
        overrides |= dict(layer_types=["sliding_attention"] * n)
    return builtin_model.build_qwen3_checkpoint(out_dir, overrides, dtype, weights=False)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth() -> float | None:
    """Bytes read + written per second by a 1 GiB device copy (median of 10)."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(times[1:])


def matmul_tflops() -> float | None:
    """bf16 [8192, 8192] x [8192, 8192] rate (median of 20), TFLOP/s."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    times = []
    for _ in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / statistics.median(times[1:]) / 1e12


def shapes(path: str) -> dict:
    cfg = json.load(open(os.path.join(path, "config.json")))
    layers, hidden, inter = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    elem = 4 if cfg.get("dtype", cfg.get("torch_dtype")) == "float32" else 2
    linear = layers * (
        hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    )
    return dict(
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        elem=elem,
        linear_params=linear,
        weight_bytes=(linear + cfg["vocab_size"] * hidden) * elem,
        kv_token_bytes=layers * 2 * kv_heads * head_dim * elem,
    )


def prefill_flop(s: dict, new: int, context_end: int) -> float:
    """Linear layers on `new` tokens plus causal attention of queries at positions
    [context_end - new, context_end) over their prefixes (QK^T and PV)."""
    attended = new * context_end - new * (new - 1) / 2  # sum of visible keys over the new queries
    return 2 * s["linear_params"] * new + 4 * s["layers"] * s["heads"] * s["head_dim"] * attended


TINY_ID_HIGH = 500  # the tiny model's vocabulary is 512


def random_prompt(n: int, seed: int, high: int = TOKEN_ID_HIGH) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g).tolist()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---- engines ----------------------------------------------------------------------------------------------


def make_engine(args, path: str, max_model_len: int, **extra):
    if args.engine == "vllm":
        from vllm import LLM as VLLM

        return VLLM(path, load_format="dummy", max_model_len=max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens, **extra)  # fmt: skip
    from nanovllm import LLM

    kwargs = dict(load_format="dummy", max_model_len=max_model_len)
    kwargs |= dict(
        max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend
    )
    if args.tiny:
        kwargs |= dict(num_kvcache_blocks=256, kvcache_block_size=16)
    return LLM(path, **(kwargs | extra))


def sampling(args, max_tokens: int):
    if args.engine == "vllm":
        from vllm import SamplingParams
    else:
        from nanovllm import SamplingParams
    return SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)


def timed_generate(llm, args, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = sampling(args, max_tokens)
    sync()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def exit_engine(llm) -> None:
    if hasattr(llm, "exit"):
        llm.exit()
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- parts ------------------------------------------------------------------------------------------------


def part_kernel(args, bandwidth: float | None) -> dict:
    import triton

    from nanovllm.kernels.paged_attention import decode_attention, default_num_splits

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    heads, kv_heads, dim, bs = 16, 8, 128, 256
    rows = {}
    for batch, ctx in ((1, 32768), (1, 131072), (16, 32768)):
        blocks = batch * ctx // bs
        k = torch.randn(blocks, bs, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        splits = default_num_splits(q.device, batch, kv_heads, 131072 // bs, bs)

        def call(q=q, k=k, v=v, tables=tables, lens=lens, out=out, splits=splits):
            decode_attention(q, k, v, tables, lens, dim**-0.5, out=out, num_splits=splits)

        call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        us = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
        read = 2 * batch * ctx * kv_heads * dim * 2
        row = dict(time_us=us, kv_tb_s=read / us / 1e6, num_splits=splits)
        if bandwidth:
            row["frac_of_copy"] = read / (us * 1e-6) / bandwidth
        rows[f"{batch}x{ctx}"] = row
        print(f"decode kernel {batch} x {ctx}: {us:.1f} us, {row['kv_tb_s']:.2f} TB/s"
              + (f" ({row['frac_of_copy']:.0%} of copy)" if bandwidth else "")
              + f", {splits} splits")  # fmt: skip
        del k, v
        torch.cuda.empty_cache()
    return rows


def part_long(args, path: str, s: dict, bandwidth, tflops) -> dict:
    limit = 1024 if args.tiny else 131072
    outputs = 16 if args.tiny else 256
    prompt_len = limit - outputs - 1  # the prompt and outputs + 1 tokens fit max_model_len
    llm = make_engine(args, path, limit)
    try:
        timed_generate(llm, args, [random_prompt(64, 99, args.id_high)], 4)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # The first long prefill also pays one-time costs (kernels compiled for its lengths, buffers
        # grown): measured on the H200 it took longer than the second prompt's prefill plus all of its
        # decode. Prefill is timed on a second prompt; decode is the third's time less that.
        timed_generate(llm, args, [random_prompt(prompt_len, 4, args.id_high)], 1)
        first = random_prompt(prompt_len, 1, args.id_high)
        prefill_s, _ = timed_generate(llm, args, [first], 1)
        total_s, made = timed_generate(llm, args, [random_prompt(prompt_len, 2, args.id_high)], outputs + 1)
        hit = first[: prompt_len - 300] + random_prompt(300, 3, args.id_high)
        hit_s, _ = timed_generate(llm, args, [hit], 1)
        # vLLM's engine core runs in a process of its own: this process's peak says nothing of it.
        peak = peak_gib() if args.engine == "nanovllm" else None
    finally:
        exit_engine(llm)
    flop = prefill_flop(s, prompt_len, prompt_len)
    decode_ms = (total_s - prefill_s) / outputs * 1e3
    # Floor of one decode step: the weights once plus every cached token's K/V at mean context length.
    mean_ctx = prompt_len + outputs / 2
    floor_ms = (s["weight_bytes"] + mean_ctx * s["kv_token_bytes"]) / bandwidth * 1e3 if bandwidth else None
    row = dict(
        prompt_tokens=prompt_len,
        prefill_s=prefill_s,
        prefill_tok_s=prompt_len / prefill_s,
        prefill_tflops=flop / prefill_s / 1e12,
        matmul_tflops=tflops,
        decode_ms_per_token=decode_ms,
        decode_floor_ms=floor_ms,
        prefix_hit_prefill_s=hit_s,
        output_tokens=made,
        peak_gib=peak,
    )
    print(f"long ({args.engine}): {prompt_len} prompt tokens prefilled in {prefill_s:.2f} s "
          f"({row['prefill_tok_s']:.0f} tok/s, {row['prefill_tflops']:.0f} TFLOP/s"
          + (f" = {row['prefill_tflops'] / tflops:.0%} of matmul {tflops:.0f})" if tflops else ")")
          + f"; decode {decode_ms:.2f} ms/token"
          + (f" (floor {floor_ms:.2f} ms, {floor_ms / decode_ms:.0%})" if floor_ms else "")
          + f"; prefix-hit prefill {hit_s:.2f} s; peak {peak} GiB")  # fmt: skip
    return row


def part_batch(args, path: str, s: dict, bandwidth, tflops) -> dict:
    num, plen, outputs = (4, 200, 16) if args.tiny else (16, 32768, 512)
    llm = make_engine(args, path, plen + outputs)
    try:
        timed_generate(llm, args, [random_prompt(64, 99, args.id_high)], 4)
        # One full-length prompt first: the first long prefill pays one-time costs (see part_long), which
        # neither timed run below should carry. (Figures before 2026-12-02's sixth session included them.)
        timed_generate(llm, args, [random_prompt(plen, 2000, args.id_high)], 2)
        # Prefill alone, on prompts of the same length that share nothing with the timed ones (no
        # prefix-cache hits): the timed run's time less this one is its decode's.
        prefill_s, _ = timed_generate(
            llm, args, [random_prompt(plen, 1000 + i, args.id_high) for i in range(num)], 1
        )
        seconds, made = timed_generate(
            llm, args, [random_prompt(plen, 10 + i, args.id_high) for i in range(num)], outputs
        )
    finally:
        exit_engine(llm)
    limit_s = None
    if bandwidth and tflops:
        prefill = num * prefill_flop(s, plen, plen) / (tflops * 1e12)
        # Prefill makes each request's first token; outputs - 1 decode steps make the rest.
        step_bytes = [s["weight_bytes"] + num * (plen + i) * s["kv_token_bytes"] for i in range(1, outputs)]
        decode = sum(step_bytes) / bandwidth
        limit_s = prefill + decode
    row = dict(requests=num, prompt_tokens=plen, output_tokens=made, seconds=seconds, tok_s=made / seconds)
    row |= dict(prefill_s=prefill_s, decode_s=seconds - prefill_s)
    if limit_s:
        row |= dict(limit_s=limit_s, limit_tok_s=made / limit_s, frac_of_limit=limit_s / seconds)
        row |= dict(prefill_floor_s=prefill, decode_floor_s=decode)
    versus = f" (limit {row['limit_tok_s']:.0f}, {row['frac_of_limit']:.0%})" if limit_s else ""
    split = f"; prefill {prefill_s:.2f} s, decode {row['decode_s']:.2f} s"
    if limit_s:
        split += f" (at matmul rate / copy bandwidth: {prefill:.2f} s / {decode:.2f} s)"
    print(
        f"batch ({args.engine}): {num} x {plen} + {outputs}: {seconds:.2f} s, {row['tok_s']:.0f} tok/s"
        + versus
        + split
    )
    return row


def part_window(args, tmp: str) -> dict:
    """Blocks held while one sequence grows, with and without a window in every layer."""
    from nanovllm import LLM, SamplingParams

    window = 64 if args.tiny else WINDOW
    prompt_len, outputs = (100, 400) if args.tiny else (8192, 2048)
    rows = {}
    for name, w in (("window", window), ("full", None)):
        path = build_model(os.path.join(tmp, f"m_{name}"), args.tiny, w)
        kwargs = dict(load_format="dummy", max_model_len=prompt_len + outputs + 1)
        kwargs |= dict(max_num_batched_tokens=args.max_num_batched_tokens if not args.tiny else 64)
        kwargs |= dict(num_kvcache_blocks=512, kvcache_block_size=16 if args.tiny else 256)
        kwargs |= dict(attention_backend=args.attention_backend)
        llm = LLM(path, **kwargs)
        held = []
        try:
            params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=outputs)
            llm.add_request(random_prompt(prompt_len, 5, args.id_high), params)
            while not llm.is_finished():
                llm.step()
                bm = llm.block_manager
                seqs = list(llm.scheduler.running) + list(llm.scheduler.waiting)
                if seqs:
                    held.append((seqs[0].num_tokens, bm.num_blocks - bm.num_free_blocks))
        finally:
            llm.exit()
        targets = (prompt_len, prompt_len + outputs // 4, prompt_len + outputs // 2, prompt_len + outputs)
        marks = sorted({min(held, key=lambda h, t=t: abs(h[0] - t)) for t in targets})
        rows[name] = [dict(length=n, blocks=b) for n, b in marks]
        print(f"blocks held vs length ({name}, window={w}): " + ", ".join(f"{n}: {b}" for n, b in marks))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="kernel,long,batch,window", help="comma-separated parts (see above)")
    p.add_argument("--engine", choices=("nanovllm", "vllm"), default="nanovllm", help="engine of long/batch")
    p.add_argument("--attention-backend", default="auto", help="nano-vllm's attention backend")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="prefill chunk budget")
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke test)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.id_high = TINY_ID_HIGH if args.tiny else TOKEN_ID_HIGH
    parts = args.parts.split(",")
    bandwidth, tflops = copy_bandwidth(), matmul_tflops()
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    results = {"engine": args.engine, "copy_bandwidth": bandwidth, "matmul_tflops": tflops}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(os.path.join(tmp, "yarn"), args.tiny)
        s = shapes(path)
        if "kernel" in parts and args.engine == "nanovllm":
            results["kernel"] = part_kernel(args, bandwidth)
        if "long" in parts:
            results["long"] = part_long(args, path, s, bandwidth, tflops)
        if "batch" in parts:
            results["batch"] = part_batch(args, path, s, bandwidth, tflops)
        if "window" in parts and args.engine == "nanovllm":
            results["window"] = part_window(args, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
