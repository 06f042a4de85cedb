"""Sweep the Triton prefill-attention tunables on the GPU at the shapes the engine prefills.

Usage: PYTHONPATH=. python3 benchmarks/tune_prefill.py [--json PATH] [--quick | --configs 'BM,BN,W,S ...']

Times every (BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernels/paged_attention.py`'s prefill kernel on
Qwen3-0.6B heads (16 query, 8 KV, head_dim 128), bf16, KV block size 256, at:
- `batch`: 16 prompts of 100-1024 tokens, keys contiguous (a reference-workload prefill step);
- `chunk@P`: one 16,384-token chunk of a long prompt whose first P tokens are already cached, keys read
  through a shuffled block table (the engine's chunked prefill; P = 0 is the first chunk, contiguous).
Then it times a whole 130,816-token prompt in 16,384-token chunks with the module's defaults, this card's
row of `kernels/tuning.py` (PREFILL_CONFIGS, left out of the sweep) and the sweep's best configuration
(`--quick`: only the first two, no sweep; `--configs`: the listed ones). Each configuration is checked
against an fp32 reference on the last rows of each case before it is timed. TFLOP/s counts the causal
attention's two matmuls (4 x head_dim x heads per visible query-key pair), what a flash-attention kernel
must compute.
"""

import argparse
import itertools
import json
import random
from pathlib import Path

import torch
import triton

import nanovllm.kernels.paged_attention as pa
import nanovllm.kernels.tuning as tuning

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 256
DTYPE = torch.bfloat16
CHUNK = 16384
LONG_PROMPT = 131072 - 256
GRID = {
    "PREFILL_BLOCK_M": (64, 128),
    "PREFILL_BLOCK_N": (64, 128),
    "num_warps": (4, 8),
    "PREFILL_NUM_STAGES": (2, 3, 4),
}
CHECK_ROWS = 64  # last query tokens of a case compared with the reference


def batch_case(gen: torch.Generator, rng: random.Random) -> dict:
    lens = [rng.randint(100, 1024) for _ in range(16)]
    total = sum(lens)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn_like(k)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    pairs = sum(n * (n + 1) // 2 for n in lens)
    return {
        "q": q,
        "k": k,
        "v": v,
        "cu_q": cu,
        "cu_k": cu,
        "max_q": max(lens),
        "tables": None,
        "pairs": pairs,
        "last_kv": (k[total - lens[-1] :], v[total - lens[-1] :]),  # the checked sequence's keys and values
    }


def chunk_case(prefix: int, gen: torch.Generator, rng: random.Random) -> dict:
    """One CHUNK-token chunk after `prefix` cached tokens (paged when prefix > 0)."""
    k_len = prefix + CHUNK
    q = torch.randn(CHUNK, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(k_len, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn_like(k)
    pairs = CHUNK * prefix + CHUNK * (CHUNK + 1) // 2
    case = {
        "q": q,
        "cu_q": torch.tensor([0, CHUNK], dtype=torch.int32, device="cuda"),
        "max_q": CHUNK,
        "cu_k": torch.tensor([0, k_len], dtype=torch.int32, device="cuda"),
        "pairs": pairs,
        "last_kv": (k, v),
    }
    if prefix == 0:
        return case | {"k": k, "v": v, "tables": None}
    num_blocks = triton.cdiv(k_len, BLOCK_SIZE)
    ids = list(range(1, num_blocks + 1))
    rng.shuffle(ids)
    tables = torch.tensor([ids], dtype=torch.int32, device="cuda")
    k_cache = torch.zeros(num_blocks + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    pad = num_blocks * BLOCK_SIZE - k_len
    for cache, flat in ((k_cache, k), (v_cache, v)):
        padded = torch.cat([flat, flat.new_zeros(pad, NUM_KV_HEADS, HEAD_DIM)])
        cache[tables[0].long()] = padded.view(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return case | {"k": k_cache, "v": v_cache, "tables": tables}


def run(case: dict) -> torch.Tensor:
    return pa.prefill_attention(
        case["q"],
        case["k"],
        case["v"],
        case["cu_q"],
        case["cu_k"],
        case["max_q"],
        0,
        HEAD_DIM**-0.5,
        block_tables=case["tables"],
    )


def check_error(case: dict, out: torch.Tensor) -> float:
    """Max abs error of the last CHECK_ROWS query tokens of the last sequence against fp32 attention."""
    q_end = out.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = (t.float().repeat_interleave(group, 1) for t in case["last_kv"])  # [k_len, heads, dim]
    k_len = k.shape[0]
    q = case["q"][q_end - CHECK_ROWS : q_end].float()  # [rows, heads, dim]
    s = torch.einsum("rhd,nhd->hrn", q, k) * HEAD_DIM**-0.5
    pos = torch.arange(k_len, device="cuda")
    q_pos = torch.arange(k_len - CHECK_ROWS, k_len, device="cuda")
    s = s.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    ref = torch.einsum("hrn,nhd->rhd", s.softmax(-1), v)
    return (out[q_end - CHECK_ROWS : q_end].float() - ref).abs().max().item()


def time_ms(case: dict) -> float:
    return triton.testing.do_bench(lambda: run(case), warmup=3, rep=200, return_mode="median")


def tflops(pairs: int, ms: float) -> float:
    """The causal attention's matmul rate: 4 x head_dim x heads FLOPs per visible query-key pair."""
    return 4 * HEAD_DIM * NUM_HEADS * pairs / ms / 1e9


def apply(cfg: dict) -> None:
    pa.PREFILL_BLOCK_M, pa.PREFILL_BLOCK_N = cfg["PREFILL_BLOCK_M"], cfg["PREFILL_BLOCK_N"]
    pa.PREFILL_NUM_STAGES = cfg["PREFILL_NUM_STAGES"]
    pa.PREFILL_NUM_WARPS = {**pa.PREFILL_NUM_WARPS, HEAD_DIM: cfg["num_warps"]}


def whole_prompt_s(gen: torch.Generator, rng: random.Random) -> tuple[float, float]:
    """(seconds, TFLOP/s) of a LONG_PROMPT-token prompt's attention in CHUNK-token chunks, one layer."""
    total_ms, pairs = 0.0, 0
    for prefix in range(0, LONG_PROMPT, CHUNK):
        case = chunk_case(prefix, gen, rng)
        if prefix + CHUNK > LONG_PROMPT:  # the last chunk is short: time it at its real length
            n = LONG_PROMPT - prefix
            case |= {
                "q": case["q"][:n].contiguous(),
                "max_q": n,
                "pairs": n * prefix + n * (n + 1) // 2,
                "cu_q": torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                "cu_k": torch.tensor([0, prefix + n], dtype=torch.int32, device="cuda"),
            }
        total_ms += time_ms(case)
        pairs += case["pairs"]
        del case
    return total_ms / 1e3, tflops(pairs, total_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="only the defaults and this card's table row")
    p.add_argument("--configs", metavar="'BM,BN,W,S ...'", help="time these instead of the grid")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rng = random.Random(0)
    cases = {"batch": batch_case(gen, rng)}
    for prefix in (0, 57344, 114432):
        cases[f"chunk@{prefix}"] = chunk_case(prefix, gen, rng)
    defaults = {
        "PREFILL_BLOCK_M": pa.PREFILL_BLOCK_M,
        "PREFILL_BLOCK_N": pa.PREFILL_BLOCK_N,
        "num_warps": pa.PREFILL_NUM_WARPS[HEAD_DIM],
        "PREFILL_NUM_STAGES": pa.PREFILL_NUM_STAGES,
    }
    # This card's row of the table, if it has one (an older tree, run for a same-call comparison with
    # PYTHONPATH=<its export>:., may have no table).
    tuned = tuning.prefill_config(torch.device("cuda")) if hasattr(tuning, "prefill_config") else None
    table = dict(zip(GRID, tuned)) if tuned else None
    tuning.PREFILL_CONFIGS = {}  # sweep the module's constants, not the table measured earlier
    configs = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    if args.quick:
        configs = [defaults] + ([table] if table and table != defaults else [])
    if args.configs:
        configs = []
        for text in args.configs.split():
            values = text.split(",")
            if len(values) != len(GRID) or not all(v.isdigit() for v in values):
                p.error(f"--configs: {text!r} is not BLOCK_M,BLOCK_N,num_warps,num_stages (four integers)")
            configs.append(dict(zip(GRID, map(int, values))))
    rows = []
    print(
        f"{'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} " + " ".join(f"{n:>14s}" for n in cases),
        flush=True,
    )
    for cfg in configs:
        values = list(cfg.values())
        apply(cfg)
        row = dict(cfg)
        try:
            for name, case in cases.items():
                err = check_error(case, run(case))
                ms = time_ms(case)
                row[name] = {"ms": ms, "tflops": tflops(case["pairs"], ms), "err": err}
        except Exception as exc:  # noqa: BLE001 - an out-of-resources config is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            print(f"{values}: {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        cells = " ".join(
            f"{row[n]['tflops']:7.0f}{'' if row[n]['err'] < 3e-2 else '(BAD)':>7s}" for n in cases
        )
        print(f"{values[0]:4d} {values[1]:4d} {values[2]:5d} {values[3]:6d} {cells}", flush=True)
    ok = [r for r in rows if "error" not in r and all(r[n]["err"] < 3e-2 for n in cases)]
    if not ok:
        raise SystemExit("no configuration ran correctly")
    # Best by the long chunks' total time (what the 128K prefill spends), the batch case reported beside.
    long_names = [n for n in cases if n.startswith("chunk")]
    best = min(ok, key=lambda r: sum(r[n]["ms"] for n in long_names))
    best_batch = min(ok, key=lambda r: r["batch"]["ms"])
    result = {"defaults": defaults, "table": table, "rows": rows, "best": best, "best_batch": best_batch}
    timed = []
    candidates = [("default", defaults), ("table", table), ("best", {k: best[k] for k in GRID})]
    ran = [{k: r[k] for k in GRID} for r in ok]
    candidates += [("listed", cfg) for cfg in configs if cfg in ran] if args.configs else []
    for label, cfg in candidates:
        if cfg is None or cfg in timed:  # no table row for this card, or a configuration timed already
            continue
        timed.append(cfg)
        apply(cfg)
        try:
            seconds, rate = whole_prompt_s(gen, rng)
        except Exception as exc:  # noqa: BLE001 - e.g. a default that no longer fits: keep the sweep's results
            print(f"whole {LONG_PROMPT}-token prompt, {label} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        result.setdefault("whole_prompt", []).append(
            {"label": label, "config": cfg, "s_per_layer": seconds, "tflops": rate}
        )
        print(f"whole {LONG_PROMPT}-token prompt, {label} {cfg}: {seconds * 1e3:.1f} ms per layer, ", end="")
        print(f"{rate:.0f} TFLOP/s")
    print(f"best for long chunks: {[best[k] for k in GRID]}; for the batch: {[best_batch[k] for k in GRID]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
