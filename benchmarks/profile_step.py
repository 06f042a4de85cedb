"""Where one decode step's time goes at a steady batch: GPU forward, sampler, and host work.

Builds the engine as bench.py does, queues --num-seqs requests of --context random prompt tokens each
(ignore_eos, max_tokens larger than the run needs), steps until every request has been prefilled, runs
--warmup decode steps, then times --steps decode steps. Per step it measures
  step wall   perf_counter around llm.step() (no extra synchronisation is added inside the loop);
  forward     CUDA events recorded before and after ModelRunner.run_model (on a CPU: its wall time), so it
              is the GPU timeline of the forward, including any gaps where the GPU waits for the host;
  sampler     CUDA events around the sampler module's forward, when it is called outside run_model;
  host/rest   step wall - forward - sampler: input preparation, scheduling, post-processing and gaps.
Events are read after the loop, once everything has finished. --torch-profile PATH also writes a
torch.profiler Chrome trace of 5 more decode steps. The bandwidth floor of a step is the weights once plus
each request's cached tokens' K/V (and the new token's K/V write) over the measured device copy bandwidth.
"""

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402  (the repository root's bench.py: bandwidth model, model lookup, versions)

PROFILE_STEPS = 5


class StepTimer:
    """Wraps callables so each call records (start, end) CUDA events, or wall time on a CPU, per label."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.current: dict[str, list] = {}
        self.steps: list[dict[str, list]] = []
        self.depth = 0  # > 0 while inside a timed call: nested calls are not timed twice

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            try:
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    self.current.setdefault(label, []).append((start, end))
                else:
                    t = time.perf_counter()
                    out = fn(*args, **kwargs)
                    self.current.setdefault(label, []).append(time.perf_counter() - t)
            finally:
                self.depth -= 1
            return out

        return timed

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}

    def milliseconds(self, label: str) -> list[float]:
        """Per step, the summed time of `label` calls (0 when none); call after the GPU has finished."""
        out = []
        for step in self.steps:
            calls = step.get(label, [])
            out.append(sum(s.elapsed_time(e) for s, e in calls) if self.cuda else 1e3 * sum(calls))
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=bench.DEFAULT_MODEL, help=f"model directory or one of {bench.BUILTIN_MODELS}"
    )
    p.add_argument("--attention-backend", choices=("auto", "triton", "flash-attn", "torch"), default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-overlap", action="store_true", help="overlap scheduling off, if the engine has it")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=50, help="decode steps to time")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument(
        "--torch-profile",
        metavar="PATH",
        help=f"write a Chrome trace of {PROFILE_STEPS} more decode steps here",
    )
    p.add_argument(
        "--top-kernels", type=int, default=25, help="kernels listed from the --torch-profile steps"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace, path: str, max_tokens: int) -> Any:
    from nanovllm import LLM

    kwargs: dict[str, Any] = dict(
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=max(4096, args.context + max_tokens),
        max_num_seqs=max(512, args.num_seqs),
        tensor_parallel_size=args.tensor_parallel_size,
    )
    kwargs["overlap_scheduling"] = not args.no_overlap
    if bench.builtin_model.builtin_load_format(path):  # a built-in checkpoint without weight files
        kwargs["load_format"] = bench.builtin_model.builtin_load_format(path)
    return LLM(path, **kwargs)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from nanovllm import SamplingParams

    path = bench.resolve_model(args.model)
    device = bench._device(args.device)
    bandwidth = bench.copy_bandwidth(device)
    max_tokens = args.warmup + args.steps + PROFILE_STEPS + 16
    llm = build_engine(args, path, max_tokens)
    # Rank 0's ModelRunner (with tensor parallelism, the one inside the runner that drives the workers):
    # its forward includes the all-reduces, so its GPU time shows what they cost.
    runner = getattr(llm.model_runner, "runner", llm.model_runner)
    cfg = runner.config.hf_config
    rng = random.Random(0)
    high = min(cfg.vocab_size, bench.TOKEN_ID_HIGH + 1)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
    for _ in range(args.num_seqs):
        llm.add_request([rng.randrange(high) for _ in range(args.context)], params)

    bench._sync()
    start, prefill_steps, num_tokens = time.perf_counter(), 0, 1
    while num_tokens > 0:  # prefill steps return positive token counts; stop after the first decode step
        _, num_tokens = llm.step()
        prefill_steps += num_tokens > 0
    bench._sync()
    prefill_s = time.perf_counter() - start
    decoded = 1  # decode steps done so far
    for _ in range(args.warmup):
        llm.step()
        decoded += 1

    cuda = device.type == "cuda"
    timer = StepTimer(cuda)
    runner.run_model = timer.wrap("forward", runner.run_model)  # run() calls self.run_model(...)
    sampler = getattr(runner, "sampler", None)
    if isinstance(sampler, torch.nn.Module):
        sampler.forward = timer.wrap("sampler", sampler.forward)
    walls, batches = [], []
    first_context = args.context + decoded + 1  # tokens each request attends over in the first timed step
    for _ in range(args.steps):
        t = time.perf_counter()
        _, num_tokens = llm.step()
        walls.append(1e3 * (time.perf_counter() - t))
        timer.end_step()
        batches.append(-num_tokens)
    bench._sync()
    del runner.run_model
    if isinstance(sampler, torch.nn.Module):
        del sampler.forward
    forward, sampling = timer.milliseconds("forward"), timer.milliseconds("sampler")
    rest = [w - f - s for w, f, s in zip(walls, forward, sampling, strict=True)]

    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(PROFILE_STEPS):
                llm.step()
            bench._sync()
        prof.export_chrome_trace(args.torch_profile)
        print(f"Wrote a torch.profiler trace of {PROFILE_STEPS} decode steps to {args.torch_profile}")
        if cuda:  # where the GPU time of those steps goes, kernel by kernel
            averages = prof.key_averages()
            sort = "device_time_total" if hasattr(averages[0], "device_time_total") else "cuda_time_total"
            print(averages.table(sort_by=sort, row_limit=args.top_kernels, max_name_column_width=60))

    weight_bytes = bench.param_bytes(runner.model)
    elem = runner.kv_cache_dtype.itemsize  # one byte for an FP8 cache
    kv_token = bench.kv_bytes_per_token(cfg, elem, args.tensor_parallel_size)
    mid_context = first_context + args.steps // 2
    batch = int(median(batches))
    step_bytes = weight_bytes + batch * (mid_context + 1) * kv_token
    floor_ms = 1e3 * step_bytes / bandwidth if bandwidth else None
    backend = runner.backend.name
    graphs = "CUDA graphs" if getattr(runner, "graph_runner", None) is not None else "eager"
    dtype = str(runner.dtype).removeprefix("torch.")
    llm.exit()

    rows = [
        ("step wall", walls),
        ("forward (GPU)" if cuda else "forward (wall)", forward),
        ("sampler", sampling),
        ("host / rest", rest),
    ]
    if args.json:
        result = {
            "model": path,
            "options": vars(args),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "attention_backend": backend,
            "dtype": dtype,
            "decode_mode": graphs,
            "versions": bench.versions(),
            "git_commit": bench.git_commit(),
            "batch": batch,
            "context_first_step": first_context,
            "prefill_steps": prefill_steps,
            "prefill_s": prefill_s,
            "median_ms": {name: median(values) for name, values in rows},
            "per_step_ms": {name: values for name, values in rows},
            "step_bytes": step_bytes,
            "copy_bytes_per_s": bandwidth,
            "floor_ms": floor_ms,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.json}")
    print(f"\nPrefill: {prefill_steps} steps, {prefill_s:.2f} s for {args.num_seqs} x {args.context} tokens")
    print(
        f"Decode: {args.steps} steps at batch {batch} (min {min(batches)}), {first_context}..."
        f"{first_context + args.steps - 1} tokens of context, attention {backend}, {dtype}, {graphs}, "
        f"tensor_parallel_size {args.tensor_parallel_size}"
    )
    print(f"{'ms per step':<16}{'median':>10}{'mean':>10}{'min':>10}{'max':>10}")
    for name, values in rows:
        print(
            f"{name:<16}{median(values):>10.3f}{statistics.fmean(values):>10.3f}{min(values):>10.3f}"
            f"{max(values):>10.3f}"
        )
    if floor_ms:
        print(
            f"{'bandwidth floor':<16}{floor_ms:>10.3f}   ({bench.human(step_bytes)} at "
            f"{bench.human(bandwidth, 'B/s')}: the forward moves it at {floor_ms / median(forward):.0%} "
            f"of copy bandwidth)"
        )
    else:
        print(
            f"bandwidth floor: not measured on {device.type} (a step moves at least "
            f"{bench.human(step_bytes)})"
        )


if __name__ == "__main__":
    main()
