"""Which Triton kernels compile after start-up, in which phase of a run, and how long each compile takes.

A kernel variant that start-up did not compile is compiled the first time a step needs it, and that step
waits (seconds, with Triton's on-disk cache cold). This runs the reference workload's requests in phases
on one engine and prints every compile with its phase, kernel and specialisation:

1. start-up (engine construction: warm-up, CUDA graph capture);
2. the reference workload (chunked prefill, every decode batch size);
3. every other request again (their prompts' blocks are in the prefix cache: prefill after cache hits);
4. the same again (should compile nothing).

    python benchmarks/compile_log.py [--model qwen3-0.6b-random] [--kv-cache-dtype auto|fp8]
    python benchmarks/compile_log.py --model tiny-qwen3 --num-seqs 8 --max-len 64     (a trial on a CPU)

Point TRITON_CACHE_DIR at an empty folder to see what a fresh machine compiles.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.runtime.jit import JITFunction  # noqa: E402

from bench import REFERENCE, make_workload, resolve_model  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402


def record_compiles(log: list, phase: list) -> None:
    """Wrap JITFunction._do_compile so that every compile appends (phase, kernel, seconds, key)."""
    compile_once = JITFunction._do_compile

    def timed(self, key, *args, **kwargs):
        start = time.perf_counter()
        kernel = compile_once(self, key, *args, **kwargs)
        log.append((phase[0], self.__name__, time.perf_counter() - start, str(key)))
        return kernel

    JITFunction._do_compile = timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b-random", help="model directory or a built-in model name")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--num-seqs", type=int, default=REFERENCE["num_seqs"], help="fewer for a trial on a CPU")
    p.add_argument(
        "--max-len", type=int, default=REFERENCE["max_input_len"], help="prompt and output lengths"
    )
    args = p.parse_args()
    log: list = []
    phase = ["start-up"]
    record_compiles(log, phase)
    llm = LLM(resolve_model(args.model), kv_cache_dtype=args.kv_cache_dtype)
    vocab = llm.config.hf_config.vocab_size
    wl = make_workload(args.num_seqs, args.max_len, args.max_len, vocab_size=vocab)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in wl.max_tokens]
    runs = (
        ("reference workload", wl.prompts, params),
        ("every other request, cached prefixes", wl.prompts[::2], params[::2]),
        ("the same again", wl.prompts[::2], params[::2]),
    )
    for name, prompts, sps in runs:
        phase[0] = name
        start = time.perf_counter()
        llm.generate(prompts, sps, use_tqdm=False)
        compiled = sum(seconds for ph, _, seconds, _ in log if ph == name)
        print(f"{name}: {time.perf_counter() - start:.2f} s, of which compiling {compiled:.2f} s")
    llm.exit()
    for ph, kernel, seconds, key in log:
        print(f"compile [{ph}] {kernel} {seconds:.2f} s key={key[:300]}")
    by_phase = {}
    for ph, _, seconds, _ in log:
        count, total = by_phase.get(ph, (0, 0.0))
        by_phase[ph] = (count + 1, total + seconds)
    for ph, (count, total) in by_phase.items():
        print(f"phase {ph}: {count} compiles, {total:.2f} s")


if __name__ == "__main__":
    main()
