"""FP8 on the GPU: the W8A8 GEMMs against bf16 F.linear, FP8 accuracy on random-weight models, and an
FP8 block-format checkpoint directory for bench.py.

Usage: PYTHONPATH=. python3 benchmarks/bench_fp8.py [gemm] [sweep] [accuracy] [--json PATH]
       PYTHONPATH=. python3 benchmarks/bench_fp8.py --make-block-checkpoint DIR [--from qwen3-8b-random]

gemm: Qwen3-0.6B and Qwen3-8B layer shapes at decode (M 1..256, replayed from CUDA graphs as the engine
runs them) and prefill (M 2048, 8192): bf16 F.linear; the block-scaled Triton kernel (activations
quantized per token and 128-group inside it); torch._scaled_mm with the same block scales where this
PyTorch accepts them (1x128 activation and 128x128 weight scales; "n/a" otherwise); the per-channel path
(per-token quant kernel + torch._scaled_mm row-wise) and its Triton GEMM. Every result is checked
against the block kernel / a dequantized reference first. TB/s counts the bytes a launch must move
(FP8 weight + scales + bf16 x and y); TFLOP/s 2MNK.
sweep: block-kernel launch configurations (tiles, warps, stages, split-K) at a few shapes; prints the best
(its JSON keeps every candidate's time). --rule-regret JSON: block_gemm_config's picks against that table.
accuracy: fp8 against bf16 logits (KL divergence, top-1 agreement) of Qwen3-0.6B-shaped random-weight
models over the first reference-workload prompts: online FP8 weights, FP8 KV cache, both.
--make-block-checkpoint: a dummy-weight directory of the built-in model with the Qwen3-FP8 block
quantization_config, for `bench.py --model DIR` (random FP8 weights and scales, no weight file).
"""

import argparse
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.kernels.fp8_gemm import (  # noqa: E402
    FP8_DTYPE,
    block_gemm_config,
    channel_gemm_triton,
    per_token_quant,
    w8a8_block_matmul,
    w8a8_channel_matmul,
)
from nanovllm.quantization.fp8 import dequantize_block  # noqa: E402

SHAPES = {  # name: (K, N)
    "0.6B qkv 1024x4096": (1024, 4096),
    "0.6B o 2048x1024": (2048, 1024),
    "0.6B gate_up 1024x6144": (1024, 6144),
    "0.6B down 3072x1024": (3072, 1024),
    "8B qkv 4096x6144": (4096, 6144),
    "8B o 4096x4096": (4096, 4096),
    "8B gate_up 4096x24576": (4096, 24576),
    "8B down 12288x4096": (12288, 4096),
}
DECODE_M = [1, 8, 32, 64, 128, 256]
PREFILL_M = [2048, 8192]
BLOCK = [128, 128]
REP_MS = 50
SWEEP_SHAPES = ["8B qkv 4096x6144", "8B down 12288x4096", "0.6B gate_up 1024x6144"]
SWEEP_M = [1, 16, 64, 256, 4096, 16384]  # 16,384: a whole prefill chunk (max_num_batched_tokens)
ACCURACY_PROMPTS = 8  # full logits of ~4,500 positions x 151,936 per run are held in host memory


def bench(fn: Callable[[], object], graph: bool) -> float:
    """Median microseconds of `fn` (replayed from a CUDA graph when `graph`)."""
    fn()
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=REP_MS) * 1e3
    return triton.testing.do_bench(fn, rep=REP_MS) * 1e3


def scaled_mm_block(q, q_scale_groups, w, w_scale, out_dtype):
    """torch._scaled_mm with 1x128 activation scales and 128x128 weight scales (DeepSeek layout)."""
    return torch._scaled_mm(
        q,
        w.t(),
        scale_a=q_scale_groups,
        scale_b=w_scale.t(),
        out_dtype=out_dtype,  # [K/128, N/128]
    )


def group_quant(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization in PyTorch (for the _scaled_mm comparison)."""
    m, k = x.shape
    g = x.float().view(m, k // group, group)
    scale = g.abs().amax(dim=-1).clamp(min=1e-10) / 448.0  # [m, k / group]
    q = (g / scale[..., None]).clamp(-448, 448).to(FP8_DTYPE).view(m, k)
    return q, scale.contiguous()


def gemm_row(name: str, m: int, w_bf16, w8, ws, wc, w_deq, gen) -> dict:
    """One shape at one M: every implementation timed, the block kernel checked first."""
    k = w8.shape[1]
    n = w8.shape[0]
    graph = m in DECODE_M
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    y = w8a8_block_matmul(x, w8, ws, BLOCK, prequantize=False)
    exact = x.float() @ w_deq.t()
    ref = exact.abs().max().item()
    row = dict(shape=name, m=m, block_rel_err=(y.float() - exact).abs().max().item() / ref)
    row["bf16_us"] = bench(lambda: F.linear(x, w_bf16), graph)
    row["block_triton_us"] = bench(lambda: w8a8_block_matmul(x, w8, ws, BLOCK, prequantize=False), graph)
    row["block_triton_prequant_us"] = bench(
        lambda: w8a8_block_matmul(x, w8, ws, BLOCK, prequantize=True), graph
    )
    try:
        q, qs = group_quant(x)
        y2 = scaled_mm_block(q, qs, w8, ws, torch.bfloat16)
        row["block_scaled_mm_rel_err"] = (y2.float() - y.float()).abs().max().item() / ref

        def block_mm():
            q, qs = group_quant(x)  # quantized in PyTorch: the GEMM's own time is the next figure
            return scaled_mm_block(q, qs, w8, ws, torch.bfloat16)

        row["block_scaled_mm_us"] = bench(block_mm, graph)
        row["block_scaled_mm_gemm_only_us"] = bench(
            lambda: scaled_mm_block(q, qs, w8, ws, torch.bfloat16), graph
        )
    except (RuntimeError, TypeError, ValueError) as e:
        row["block_scaled_mm_us"] = None
        row["block_scaled_mm_error"] = str(e).splitlines()[0][:160]
    row["channel_scaled_mm_us"] = bench(lambda: w8a8_channel_matmul(x, w8, wc, use_scaled_mm=True), graph)
    row["channel_triton_us"] = bench(
        lambda: channel_gemm_triton(*per_token_quant(x), w8, wc, torch.bfloat16), graph
    )
    row["per_token_quant_us"] = bench(lambda: per_token_quant(x), graph)
    fp8_bytes = n * k + ws.numel() * 4 + 2 * m * (k + n)
    for key, size in (
        ("bf16", 2 * n * k + 2 * m * (k + n)),
        ("block_triton", fp8_bytes),
        ("channel_scaled_mm", fp8_bytes),
    ):
        row[f"{key}_tbps"] = size / row[f"{key}_us"] / 1e6
        row[f"{key}_tflops"] = 2 * m * n * k / row[f"{key}_us"] / 1e6
    block_mm_us = row["block_scaled_mm_us"] or float("nan")
    print(
        f"{name:>24} M={m:>5}  bf16 {row['bf16_us']:8.1f} us  block-triton {row['block_triton_us']:8.1f} us "
        f"({row['bf16_us'] / row['block_triton_us']:.2f}x, {row['block_triton_tbps']:.2f} TB/s, "
        f"prequant {row['block_triton_prequant_us']:.1f} us, "
        f"{row['block_triton_tflops']:.0f} TFLOP/s)  block-scaled_mm {block_mm_us:8.1f} us  "
        f"channel-scaled_mm {row['channel_scaled_mm_us']:8.1f} us  "
        f"channel-triton {row['channel_triton_us']:8.1f} us  err {row['block_rel_err']:.1e}",
        flush=True,
    )
    return row


def run_gemm() -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n) in SHAPES.items():
        w_bf16 = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        w8 = (torch.randn(n, k, device="cuda", generator=gen) * 2).to(FP8_DTYPE)
        ws = torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device="cuda", generator=gen) * 0.01 + 1e-3
        wc = torch.rand(n, device="cuda", generator=gen) * 0.01 + 1e-3
        w_deq = dequantize_block(w8, ws, BLOCK, torch.float32)
        for m in DECODE_M + PREFILL_M:
            rows.append(gemm_row(name, m, w_bf16, w8, ws, wc, w_deq, gen))
    return rows


def sweep_configs(m: int):
    """Tiles, warps, stages; split-K up to 256 rows (with 2 and 4, the default's choices at those rows);
    from 4096 rows the launch order too (GROUP_M 8: programs that run at once share rows of x and
    columns of W in L2; 1: row tiles fastest)."""
    grid = itertools.product(
        [16, 64] if m <= 64 else [64, 128],
        (64, 128),
        (4, 8),
        (3, 4),
        (1, 2, 4, 8) if m <= 64 else (1, 2, 4) if m <= 256 else (1,),  # split-K: a runtime argument
        (1, 8) if m >= 4096 else (1,),
    )
    for bm, bn, warps, stages, split, group_m in grid:
        yield dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, split_k=split, GROUP_M=group_m)


def sweep_one(name: str, m: int, w8, ws, gen) -> dict:
    x = torch.randn(m, w8.shape[1], device="cuda", generator=gen, dtype=torch.bfloat16)
    ref = w8a8_block_matmul(x, w8, ws, BLOCK).float()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = block_gemm_config(m, w8.shape[0], triton.cdiv(w8.shape[1], 128), sms)
    best, timed = None, []
    for cfg in sweep_configs(m):
        try:
            y = w8a8_block_matmul(x, w8, ws, BLOCK, cfg)
            if (y.float() - ref).abs().max() > 1e-2 * ref.abs().max():
                continue
            us = bench(lambda c=cfg: w8a8_block_matmul(x, w8, ws, BLOCK, c), m <= 256)
        except Exception:  # out of shared memory and the like: not a candidate
            continue
        timed.append(dict(cfg, us=round(us, 2)))  # every candidate, so a rule can be fitted to all of them
        if best is None or us < best[0]:
            best = (us, cfg)
    default_us = bench(lambda: w8a8_block_matmul(x, w8, ws, BLOCK, default), m <= 256)
    print(f"sweep {name:>24} M={m:>5}: best {best[0]:8.1f} us {best[1]}")
    print(f"{'':>37}default {default_us:8.1f} us {default}")
    return dict(
        shape=name, m=m, best_us=best[0], best=best[1], default_us=default_us, default=default, timed=timed
    )


def run_sweep() -> list[dict]:
    results = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name in SWEEP_SHAPES:
        k, n = SHAPES[name]
        w8 = (torch.randn(n, k, device="cuda", generator=gen) * 2).to(FP8_DTYPE)
        ws = torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device="cuda", generator=gen) * 0.01
        results.extend(sweep_one(name, m, w8, ws, gen) for m in SWEEP_M)
    return results


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return kl, top1


def run_accuracy(model_name: str = "qwen3-0.6b-random") -> dict:
    """Full logits at every prompt position, captured from the engine's compute_logits."""
    import bench as bench_py
    from nanovllm import LLM, SamplingParams
    from nanovllm.utils.builtin_model import builtin_load_format, get_builtin_model

    path = get_builtin_model(model_name)
    wl = bench_py.make_workload(256, 1024, 1024)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    prompts = [[t % vocab for t in p] for p in wl.prompts[:ACCURACY_PROMPTS]]  # unchanged at 151,936
    load = builtin_load_format(path)
    results = {}
    runs = {"bf16": {}, "fp8 weights": {"quantization": "fp8"}, "fp8 kv": {"kv_cache_dtype": "fp8"}}
    runs["fp8 weights + kv"] = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    for tag, extra in runs.items():
        llm = LLM(
            path, enforce_eager=True, max_model_len=2048, **({"load_format": load} if load else {}), **extra
        )
        captured = []
        model = llm.model_runner.model
        original = model.compute_logits

        def capture(hidden, original=original, captured=captured):
            out = original(hidden)
            if out is not None and hidden.shape[0] > 1:
                captured.append(out.float().cpu())
            return out

        model.compute_logits = capture
        llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        del model.compute_logits
        llm.exit()
        results[tag] = torch.cat([c for c in captured if c.shape[0] > len(prompts)], 0)
    ref = results.pop("bf16")
    out = {}
    for tag, logits in results.items():
        kl, top1 = kl_top1(ref, logits)
        out[tag] = {"kl": kl, "top1_agreement": top1, "positions": ref.shape[0]}
        print(f"accuracy {tag:>18}: KL(bf16 || fp8) {kl:.3e} nats, top-1 agreement {top1:.4f}", end="")
        print(f" over {ref.shape[0]} positions")
    return out


def make_block_checkpoint(out_dir: str, source: str) -> None:
    from nanovllm.utils.builtin_model import get_builtin_model

    src = get_builtin_model(source)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": BLOCK,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "nanovllm_builtin.json"), "w") as f:
        json.dump({"load_format": "dummy", "source": source}, f)
    print(f"FP8 block-format dummy checkpoint of {source} in {out_dir}")


def rule_regret(path: str, num_sms: int = 132) -> None:
    """For each point of a sweep JSON (`sweep --json`, with every candidate's time): the launch that
    block_gemm_config picks today, its time where the sweep timed that launch, and how far it is from the
    best. Runs without a GPU, so a rule can be edited and checked against one call's table."""
    with open(path) as f:
        points = json.load(f)["sweep"]
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "split_k", "GROUP_M")
    for point in points:
        if "timed" not in point:
            raise SystemExit(f"{path} has the bests only: re-run the sweep (it now keeps every time)")
        k, n = SHAPES[point["shape"]]
        pick = {"GROUP_M": 1, **block_gemm_config(point["m"], n, triton.cdiv(k, 128), num_sms)}
        times = {tuple(c[key] for key in keys): c["us"] for c in point["timed"]}
        us = times.get(tuple(pick[key] for key in keys))
        shown = f"{us:8.1f} us, {100 * (us / point['best_us'] - 1):5.1f}% over" if us else "  not in the grid"
        print(f"{point['shape']:>24} M={point['m']:>5}: rule {shown} best {point['best_us']:8.1f} us  {pick}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", help="gemm (default), sweep, accuracy")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--make-block-checkpoint", metavar="DIR")
    p.add_argument("--from", dest="source", default="qwen3-8b-random")
    p.add_argument("--rule-regret", metavar="JSON", help="check block_gemm_config against a sweep's JSON")
    p.add_argument(
        "--accuracy-model", default="qwen3-0.6b-random", help="built-in model of the accuracy part"
    )
    args = p.parse_args()
    if args.rule_regret:
        rule_regret(args.rule_regret)
        return
    if args.make_block_checkpoint:
        make_block_checkpoint(args.make_block_checkpoint, args.source)
        return
    if args.parts == ["accuracy"] and not torch.cuda.is_available():  # a CPU smoke run
        print(json.dumps(run_accuracy(args.accuracy_model)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    result = {}
    for part in args.parts or ["gemm"]:
        if part not in ("gemm", "sweep", "accuracy"):
            raise SystemExit(f"unknown part {part!r}: choose gemm, sweep, accuracy")
        if part == "accuracy":
            result[part] = run_accuracy(args.accuracy_model)
        else:
            result[part] = {"gemm": run_gemm, "sweep": run_sweep}[part]()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
