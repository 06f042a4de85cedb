"""Structured outputs on a GPU: what a grammar mask costs per step, and what constrained requests cost
the others in a batch.

1. The mask at 1, 26 and 256 rows of [256, vocab] logits, timed with CUDA events: our kernel
   (nanovllm/kernels/token_bitmask.py, in place over a row-index tensor) in bf16 (the engine's logits)
   and float32, beside xgrammar's kernel on the same rows (its `indices` form, and the engine's earlier
   path: rows gathered, masked by xgrammar, scattered back); the bitmask's copy to the device from pinned
   and from pageable memory; the host fill, one matcher at a time and with xgrammar's batch matcher.
2. The reference workload (bench.py's prompts and max_tokens, temperature 0.6, ignore_eos) run plain and
   with every `1/fraction`-th request constrained to a small JSON schema, in one engine: tok/s of all
   requests and of the unconstrained ones alone (their tokens over the same wall time).
3. Where the mixed run's time goes, against the unconstrained requests alone: each launch wrapped by
   bench.py's StepTimeline (CUDA events), plus per step the constrained rows masked, the constrained rows
   sitting out (their token in flight), the host's fill time and each step's host time; GPU time of
   prefill and decode, GPU idle between steps (split by the kind of step that waited), and the rest.

    python benchmarks/bench_structured.py [--model qwen3-0.6b-random] [--fraction 0.1] [--json PATH]
                                          [--mask-only]   (part 1 alone)
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import REFERENCE, StepTimeline, make_workload, resolve_model  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.kernels.token_bitmask import apply_token_bitmask_triton  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402

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


def cuda_ms(fn, iters: int = 50) -> float:
    """Mean milliseconds of fn() on the GPU (CUDA events around `iters` calls, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_mask(llm: LLM, rows: int, batch: int = 256) -> dict:
    import xgrammar as xgr

    vocab = llm.config.hf_config.vocab_size
    manager = llm._structured
    grammar = manager.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [manager.new_matcher(grammar) for _ in range(rows)]
    index = list(range(0, batch, batch // rows))[:rows]  # spread over the batch
    host = manager.bitmask(matchers, index)  # warm-up: the batch matcher's threads, pinned blocks
    t = time.perf_counter()
    host = manager.bitmask(matchers, index)
    fill_batch_ms = (time.perf_counter() - t) * 1e3
    single = xgr.allocate_token_bitmask(rows, vocab)
    t = time.perf_counter()
    for i, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(single, i)
    fill_single_ms = (time.perf_counter() - t) * 1e3
    assert torch.equal(single, host.bitmask)
    dev = host.to(torch.device("cuda"))
    torch.cuda.synchronize()
    out = {"rows": rows, "batch": batch, "vocab": vocab, "fill_batch_ms": fill_batch_ms}
    out["fill_one_by_one_ms"] = fill_single_ms
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(batch, vocab, device="cuda").to(dtype)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        out[f"apply_ms_{name}"] = cuda_ms(
            lambda x=logits: apply_token_bitmask_triton(x, dev.rows, dev.bitmask)
        )
    logits = torch.randn(batch, vocab, device="cuda")  # xgrammar's timings in float32, as the engine had
    full = torch.full((batch, host.bitmask.shape[1]), -1, dtype=torch.int32, device="cuda")
    full[dev.rows.long()] = dev.bitmask  # its indices form reads the bitmask row of each logits row
    index_dev = dev.rows
    try:  # a comparison only: a failure of xgrammar's kernel leaves the rest of the run going
        out["xgrammar_indices_ms_fp32"] = cuda_ms(
            lambda: xgr.apply_token_bitmask_inplace(logits, full, vocab_size=vocab, indices=index_dev)
        )
    except Exception as e:  # noqa: BLE001
        print(f"xgrammar's apply with indices failed: {e}")
        out["xgrammar_indices_ms_fp32"] = float("nan")

    def gather_scatter():  # the engine's path before the kernel (the mask already on the device)
        constrained = logits[index_dev.long()]
        xgr.apply_token_bitmask_inplace(constrained, dev.bitmask, vocab_size=vocab)
        logits[index_dev.long()] = constrained

    out["xgrammar_gather_scatter_ms_fp32"] = cuda_ms(gather_scatter)
    pageable = host.bitmask.clone()
    out["copy_pinned_ms"] = cuda_ms(lambda: host.bitmask.to("cuda", non_blocking=True))
    out["copy_pageable_ms"] = cuda_ms(lambda: pageable.to("cuda", non_blocking=True))
    out["copy_mb"] = host.bitmask.numel() * 4 / 1e6
    return out


class StepNotes:
    """Per launch: constrained rows masked, constrained rows sitting out, and the host's time (the launch
    call, and the bitmask fill before it); around bench.py's StepTimeline, which times the GPU."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.timeline = StepTimeline(cuda=True)
        self.notes: list[dict] = []
        self.fill_s = 0.0

    def __enter__(self) -> "StepNotes":
        runner, manager, scheduler = self.llm.model_runner, self.llm._structured, self.llm.scheduler
        timed = self.timeline.wrap(runner.launch)
        fill = manager.bitmask

        def launch(batch, token_bitmask=None):
            held = sum(s.needs_host_tokens and s.has_pending_token for s in scheduler.running)
            t = time.perf_counter()
            out = timed(batch) if token_bitmask is None else timed(batch, token_bitmask)
            self.notes.append(
                {
                    "masked": len(token_bitmask) if token_bitmask is not None else 0,
                    "held": held,
                    "launch_host_s": time.perf_counter() - t,
                    "fill_s": self.fill_s,
                }
            )
            self.fill_s = 0.0
            return out

        def timed_fill(matchers, rows):
            t = time.perf_counter()
            out = fill(matchers, rows)
            self.fill_s += time.perf_counter() - t
            return out

        runner.launch, manager.bitmask = launch, timed_fill
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.model_runner.launch, self.llm._structured.bitmask

    def summary(self, seconds: float, weight_bytes: int) -> dict:
        """Call once the GPU has finished. GPU idle before each step is put down to that step's kind."""
        steps = self.timeline.steps
        idle = {"mask": 0.0, "held": 0.0, "other": 0.0}
        for prev, cur, note in zip(steps, steps[1:], self.notes[1:]):
            gap = max(0.0, prev["events"][1].elapsed_time(cur["events"][0]) / 1e3)
            idle["mask" if note["masked"] else "held" if note["held"] else "other"] += gap
        first, last = steps[0]["events"][0], steps[-1]["events"][1]
        span = first.elapsed_time(last) / 1e3
        b = self.timeline.breakdown(weight_bytes, 0, None)
        decode = [(s, n) for s, n in zip(steps, self.notes) if not s["prefill"]]
        return {
            "seconds": seconds,
            "gpu_span_s": span,
            "outside_span_s": seconds - span,  # before the first launch and after the last one
            "prefill_steps": b["prefill_steps"],
            "prefill_gpu_s": b["prefill_s"],
            "decode_steps": b["decode_steps"],
            "decode_gpu_s": b["decode_gpu_s"],
            "decode_rows": sum(s["rows"] for s, _ in decode),
            "gpu_idle_s": b["gpu_idle_between_steps_s"],
            "gpu_idle_before_mask_steps_s": idle["mask"],
            "gpu_idle_before_held_steps_s": idle["held"],
            "gpu_idle_before_other_steps_s": idle["other"],
            "mask_steps": sum(n["masked"] > 0 for n in self.notes),
            "mask_steps_gpu_s": sum(s["gpu_s"] for s, n in zip(steps, self.notes) if n["masked"]),
            "masked_rows": sum(n["masked"] for n in self.notes),
            "held_steps": sum(n["held"] > 0 for n in self.notes),
            "held_rows": sum(n["held"] for n in self.notes),
            "fill_s": sum(n["fill_s"] for n in self.notes),
            "launch_host_s": sum(n["launch_host_s"] for n in self.notes),
        }


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def run(llm: LLM, prompts, params) -> tuple[float, list, dict]:
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model_runner.model.parameters())
    torch.cuda.synchronize()
    with StepNotes(llm) as notes:
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return seconds, outputs, notes.summary(seconds, weight_bytes)


def print_steps(name: str, s: dict) -> None:
    def ms(key: str) -> str:
        return f"{s[key] * 1e3:.1f} ms"

    print(
        f"{name}: {s['seconds']:.3f} s = GPU span {s['gpu_span_s']:.3f} s + {ms('outside_span_s')} outside; "
        f"prefill {s['prefill_steps']} steps {ms('prefill_gpu_s')}, decode {s['decode_steps']} steps "
        f"({s['decode_rows']:,} rows) {ms('decode_gpu_s')}, GPU idle {ms('gpu_idle_s')} (before mask steps "
        f"{ms('gpu_idle_before_mask_steps_s')}, before steps with rows sitting out "
        f"{ms('gpu_idle_before_held_steps_s')}, other {ms('gpu_idle_before_other_steps_s')})"
    )
    print(
        f"  {s['mask_steps']} mask steps ({s['masked_rows']} rows, GPU {ms('mask_steps_gpu_s')}), "
        f"{s['held_steps']} steps with constrained rows sitting out ({s['held_rows']} row-steps); "
        f"host: fill {ms('fill_s')}, launch calls {ms('launch_host_s')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b-random", help="model directory or a built-in model name")
    p.add_argument("--fraction", type=float, default=0.1, help="share of requests constrained to the schema")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--mask-only", action="store_true", help="time the mask (part 1) and stop")
    args = p.parse_args()
    llm = LLM(resolve_model(args.model))
    results = {"mask": [time_mask(llm, rows) for rows in (1, 26, 256)]}
    for m in results["mask"]:
        print(
            f"mask {m['rows']:>3} of {m['batch']} x {m['vocab']:,}: apply {m['apply_ms_bf16']:.4f} ms bf16, "
            f"{m['apply_ms_fp32']:.4f} ms fp32; xgrammar fp32 indices {m['xgrammar_indices_ms_fp32']:.4f} "
            f"ms, gather+scatter {m['xgrammar_gather_scatter_ms_fp32']:.4f} ms; copy {m['copy_mb']:.2f} MB "
            f"pinned {m['copy_pinned_ms']:.4f} ms, pageable {m['copy_pageable_ms']:.4f} ms; fill: batch "
            f"{m['fill_batch_ms']:.2f} ms, one by one {m['fill_one_by_one_ms']:.2f} ms"
        )
    if args.mask_only:
        return finish(llm, results, args.json)
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
        seconds, outputs, steps = run(llm, prompts, params)
        tokens = [len(o.outputs[0].token_ids) for o in outputs]
        free = sum(t for t, sp in zip(tokens, params) if sp.structured_outputs is None)
        valid = sum(parses(o.outputs[0].text) for o, sp in zip(outputs, params) if sp.structured_outputs)
        row = {
            "seconds": seconds,
            "tok_per_s": sum(tokens) / seconds,
            "unconstrained_tok_per_s": free / seconds,
            "constrained": sum(sp.structured_outputs is not None for sp in params),
            "constrained_valid": valid,
            "steps": steps,
        }
        results[name] = row
        print(
            f"{name:>26}: {seconds:.2f} s, {row['tok_per_s']:,.0f} tok/s, unconstrained "
            f"{row['unconstrained_tok_per_s']:,.0f} tok/s, {row['constrained']} constrained ({valid} parsed)"
        )
    for name in ("unconstrained only, again", "mixed"):
        print_steps(name, results[name]["steps"])
    alone, mixed_steps = results["unconstrained only, again"]["steps"], results["mixed"]["steps"]
    keys = ("seconds", "prefill_gpu_s", "decode_gpu_s", "gpu_idle_s", "outside_span_s")
    loss = {k: mixed_steps[k] - alone[k] for k in keys}
    results["mixed_minus_alone"] = loss
    print(
        "mixed - alone: "
        + ", ".join(f"{k} {v * 1e3:+.1f} ms" for k, v in loss.items())
        + " (seconds = GPU span + outside it; span = prefill + decode GPU + idle)"
    )
    finish(llm, results, args.json)


def finish(llm: LLM, results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    llm.exit()


if __name__ == "__main__":
    main()
