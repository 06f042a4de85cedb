"""Structured outputs on a GPU: what a grammar mask costs per step, and what constrained requests cost
the others in a batch.

1. The mask: `apply_token_bitmask` on [rows, vocab] logits (the rows gathered, masked by xgrammar's
   kernel, written back), timed with CUDA events; and the host time to fill the rows' bitmasks.
2. The reference workload (bench.py's prompts and max_tokens, temperature 0.6, ignore_eos) run plain and
   with every `1/fraction`-th request constrained to a small JSON schema, in one engine: tok/s of all
   requests and of the unconstrained ones alone (their tokens over the same wall time).

    python benchmarks/bench_structured.py [--model qwen3-0.6b-random] [--fraction 0.1] [--json PATH]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import REFERENCE, make_workload, resolve_model  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402
from nanovllm.structured_output.manager import apply_token_bitmask  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cyd"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}


def time_mask(llm: LLM, rows: int, iters: int = 50) -> dict:
    vocab = llm.config.hf_config.vocab_size
    manager = llm._structured
    grammar = manager.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [manager.new_matcher(grammar) for _ in range(rows)]
    t = time.perf_counter()
    bitmask = manager.bitmask(matchers)
    fill_ms = (time.perf_counter() - t) * 1e3
    logits = torch.randn(rows, vocab, device="cuda")
    index = list(range(rows))
    apply_token_bitmask(logits, index, bitmask)  # warm-up (kernel compile)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        apply_token_bitmask(logits, index, bitmask)
    end.record()
    torch.cuda.synchronize()
    return {"rows": rows, "vocab": vocab, "apply_ms": start.elapsed_time(end) / iters, "fill_ms": fill_ms}


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def run(llm: LLM, prompts, params) -> tuple[float, list]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b-random", help="model directory or a built-in model name")
    p.add_argument("--fraction", type=float, default=0.1, help="share of requests constrained to the schema")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args()
    llm = LLM(resolve_model(args.model))
    results = {"mask": [time_mask(llm, rows) for rows in (1, 26, 256)]}
    for m in results["mask"]:
        print(
            f"mask {m['rows']:>3} x {m['vocab']:,}: apply {m['apply_ms']:.3f} ms, fill {m['fill_ms']:.2f} ms"
        )
    wl = make_workload(REFERENCE["num_seqs"], REFERENCE["max_input_len"], REFERENCE["max_output_len"])
    plain = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in wl.max_tokens]
    every = max(1, round(1 / args.fraction))
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    mixed = [
        SamplingParams(
            temperature=0.6, ignore_eos=True, max_tokens=p.max_tokens, structured_outputs=constraint
        )
        if i % every == 0
        else p
        for i, p in enumerate(plain)
    ]
    llm.generate(["warm-up"] * 2, [plain[0], mixed[0]], use_tqdm=False)
    free_prompts = [q for i, q in enumerate(wl.prompts) if i % every]
    free_params = [sp for i, sp in enumerate(plain) if i % every]
    runs = (
        ("plain", wl.prompts, plain),
        ("unconstrained only", free_prompts, free_params),
        ("mixed", wl.prompts, mixed),
        ("unconstrained only, again", free_prompts, free_params),
    )
    for name, prompts, params in runs:
        seconds, outputs = run(llm, prompts, params)
        tokens = [len(o.outputs[0].token_ids) for o in outputs]
        free = sum(t for t, sp in zip(tokens, params) if sp.structured_outputs is None)
        valid = sum(parses(o.outputs[0].text) for o, sp in zip(outputs, params) if sp.structured_outputs)
        row = {
            "seconds": seconds,
            "tok_per_s": sum(tokens) / seconds,
            "unconstrained_tok_per_s": free / seconds,
            "constrained": sum(sp.structured_outputs is not None for sp in params),
            "constrained_valid": valid,
        }
        results[name] = row
        print(
            f"{name:>26}: {seconds:.2f} s, {row['tok_per_s']:,.0f} tok/s, unconstrained "
            f"{row['unconstrained_tok_per_s']:,.0f} tok/s, {row['constrained']} constrained ({valid} parsed)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    llm.exit()


if __name__ == "__main__":
    main()
