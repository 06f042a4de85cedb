"""Throughput on the reference workload, and how close it comes to the GPU's memory-bandwidth limit.

Reference workload (README, "Benchmark"): random.seed(0); 256 prompts of randint(100, 1024) token ids
drawn with randint(0, 10000), then one SamplingParams(temperature=0.6, ignore_eos=True,
max_tokens=randint(100, 1024)) each; one short warm-up generate; the timed generate makes 133,966
output tokens. Deviations, only when asked for:
- a maximum length below 100 (tiny smoke tests) draws lengths from randint(max(1, max // 4), max);
- a model whose vocabulary has at most 10,000 ids gets every drawn id reduced modulo its vocabulary size;
- --shared-prefix N draws N ids from random.Random(1) after everything else and writes them over the first
  N tokens of every prompt longer than N (shorter prompts stay as drawn); no prompt length changes.
Limit: decode must at least read the weights once per step, read every cached token of every running
request once per step and write the new token's K/V; those bytes over the measured device copy bandwidth
are the floor time, and output tokens over the floor time are the limit. With --tensor-parallel-size N
each GPU holds and reads its shard (1/N of the weights, except the small replicated norms, and 1/N of
the KV heads) in parallel with the others, so the floor counts one GPU's bytes over one GPU's bandwidth.
A mixture-of-experts model reads per step only the experts its batch activates: the floor counts the
other weights once per step plus, per sparse layer, the distinct experts a batch of that step's size
activates on average under uniform routing (E * (1 - (1 - top_k / E) ** batch): at batch 256 with top-8 of
128 that is all but 0.0003 of them); prefill FLOPs count the top_k experts per token.
Built-in checkpoints without weight files (qwen3-30b-a3b-random) run with load_format="dummy".
"""

import argparse
import dataclasses
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nanovllm.utils import builtin_model

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = "~/huggingface/Qwen3-0.6B/"
BUILTIN_MODELS = tuple(builtin_model.BUILTIN_MODELS)
TOKEN_ID_HIGH = 10000
REFERENCE = {"num_seqs": 256, "max_input_len": 1024, "max_output_len": 1024}
REFERENCE_TOKENS = (133966, 142827)  # output, prompt
PREFILL_TFLOPS = 800.0  # assumed bf16 matmul rate on an H100 for the "with prefill" limit (KERNELS.md)


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(
    num_seqs: int,
    max_input_len: int,
    max_output_len: int,
    shared_prefix: int = 0,
    vocab_size: int | None = None,
) -> Workload:
    """The reference draws in the reference order: all prompts first, then all max_tokens."""

    def low(high: int) -> int:
        return 100 if high >= 100 else max(1, high // 4)

    random.seed(0)
    prompts = [
        [random.randint(0, TOKEN_ID_HIGH) for _ in range(random.randint(low(max_input_len), max_input_len))]
        for _ in range(num_seqs)
    ]
    max_tokens = [random.randint(low(max_output_len), max_output_len) for _ in range(num_seqs)]
    if shared_prefix > 0:
        rng = random.Random(1)
        prefix = [rng.randint(0, TOKEN_ID_HIGH) for _ in range(shared_prefix)]
        for p in prompts:
            if len(p) > shared_prefix:
                p[:shared_prefix] = prefix
    if vocab_size is not None and vocab_size <= TOKEN_ID_HIGH:
        prompts = [[t % vocab_size for t in p] for p in prompts]
    return Workload(prompts, max_tokens)


# ---- the bandwidth limit -----------------------------------------------------------------------------------


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(cfg: Any, elem_size: int, tensor_parallel_size: int = 1) -> int:
    """K and V bytes of one token on one GPU (with tensor parallelism, its share of the KV heads)."""
    kv_heads = cfg.num_key_value_heads // tensor_parallel_size
    return cfg.num_hidden_layers * 2 * kv_heads * _head_dim(cfg) * elem_size


@dataclasses.dataclass
class MoeShape:
    """What a mixture-of-experts step reads of its experts (on one GPU)."""

    num_experts: int
    top_k: int
    sparse_layers: int
    expert_params: int  # one expert of one layer: gate, up and down (all ranks)
    expert_bytes: int  # the same on one GPU (its slice of the expert width)

    def active_experts(self, batch: int) -> float:
        """Distinct experts of one layer a batch of `batch` tokens activates on average when routing is
        uniform (a token misses a given expert with probability 1 - top_k / E)."""
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)

    def step_weight_bytes(self, weight_bytes: int, batch: int) -> float:
        """Weight bytes one decode step at this batch size reads: all but the experts, once, plus the
        active experts of each sparse layer."""
        experts = self.sparse_layers * self.expert_bytes
        return weight_bytes - experts * self.num_experts + experts * self.active_experts(batch)


def moe_shape(cfg: Any, elem_size: int, tensor_parallel_size: int = 1) -> MoeShape | None:
    """The experts of a Qwen2/3-MoE or Mixtral config (None for a dense model)."""
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if not num_experts:
        return None
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    layers = sum(1 for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    params = 3 * cfg.hidden_size * width
    per_gpu = params * elem_size // tensor_parallel_size
    return MoeShape(num_experts, cfg.num_experts_per_tok, layers, params, per_gpu)


def decode_bytes(
    wl: Workload, weight_bytes: int, kv_token_bytes: int, moe: MoeShape | None = None
) -> dict[str, int]:
    """Least bytes decode moves: step s = 1..max(max_tokens)-1 (token 1 comes from prefill) reads the weights
    once (of an MoE model, the experts that step's batch activates), and each request still running at step
    s reads its prompt_len + s cached tokens and writes one."""
    steps = max(wl.max_tokens) - 1
    read = written = 0
    for prompt, m in zip(wl.prompts, wl.max_tokens, strict=True):
        n = m - 1  # the decode steps this request takes part in
        read += n * len(prompt) + n * (n + 1) // 2  # sum over s = 1..n of (prompt_len + s)
        written += n
    if moe is None:
        weights = steps * weight_bytes
    else:
        remaining = [m - 1 for m in wl.max_tokens]
        batches = [sum(1 for n in remaining if n >= s) for s in range(1, steps + 1)]
        weights = int(sum(moe.step_weight_bytes(weight_bytes, b) for b in batches))
    parts = {
        "steps": steps,
        "weights": weights,
        "kv_read": read * kv_token_bytes,
        "kv_write": written * kv_token_bytes,
    }
    parts["total"] = parts["weights"] + parts["kv_read"] + parts["kv_write"]
    return parts


def prefill_tflop(wl: Workload, cfg: Any, non_embedding_params: int) -> float:
    """Matmul work of prefill: 2 FLOPs per non-embedding parameter per token, plus causal attention."""
    attn = sum(len(p) * (len(p) + 1) for p in wl.prompts) * 2 * cfg.num_attention_heads * _head_dim(cfg)
    return (2 * non_embedding_params * wl.prompt_tokens + attn * cfg.num_hidden_layers) / 1e12


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float | None:
    """Bytes read + written per second by a device-to-device copy (median of `repeats`); None off CUDA."""
    if device.type != "cuda":
        return None
    seconds = []
    with torch.cuda.device(device):
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        del src, dst
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return 2 * nbytes / statistics.median(seconds)


def param_bytes(module: torch.nn.Module) -> int:
    # Tied weights counted once. A quantized layer's parameters are its packed integers plus its scales
    # and zeros (AWQ/GPTQ: int32 words of eight 4-bit weights), so these are the bytes a step reads.
    return sum(p.numel() * p.element_size() for p in module.parameters())


# Parameters of quantized layers: packed int32 words of 4-bit weights, and what is not a weight.
_PACKED_WEIGHTS = {"qweight": 8}
_NOT_WEIGHTS = ("qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv")


def weight_count(module: torch.nn.Module) -> int:
    """Weights the parameters stand for (each 4-bit value one; scales and zeros none): the prefill FLOPs."""
    total = 0
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _NOT_WEIGHTS:
            total += p.numel() * _PACKED_WEIGHTS.get(leaf, 1)
    return total


def meta_param_bytes(path: str, elem_size: int) -> int:
    """Bytes of a checkpoint's parameters at `elem_size` per value, from its config alone (a model built
    on the meta device; for checkpoints without weight files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters()) * elem_size


def human(n: float, unit: str = "B") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


# ---- engines: each returns (seconds, generated tokens, details) --------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"steps": 0}
    return {
        "steps": len(values),
        "sum": sum(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
    }


def memory_stats() -> dict[str, int] | None:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    free, total = torch.cuda.mem_get_info()
    return {
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "used_total_minus_free": total - free,
        "total": total,
    }


Result = tuple[float, int, dict[str, Any]]  # seconds, generated tokens, details


# Decode batch-size buckets of the breakdown (upper bounds, inclusive).
BATCH_BUCKETS = (8, 32, 64, 128, 192, 256)


class StepTimeline:
    """Wraps ModelRunner.launch to note, per step, its phase, rows and tokens, and when the GPU began and
    finished it (CUDA events recorded before and after the launch, read once the run is over; on a CPU,
    the launch's wall time, since the CPU computes inside it). Events cost the host about a microsecond
    and the GPU nothing, so the run is timed as it would be without them."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: list[dict[str, Any]] = []

    def wrap(self, launch: Any) -> Any:
        def timed(batch: Any, *args: Any, **kwargs: Any) -> Any:
            step: dict[str, Any] = {"prefill": batch.is_prefill, "rows": len(batch.seqs)}
            if batch.is_prefill:
                step["tokens"] = sum(batch.num_new_tokens)
            else:  # the cached tokens each sequence attends over (its new token included)
                step["context"] = sum(seq.num_tokens for seq in batch.seqs)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = launch(batch, *args, **kwargs)
                end.record()
                step["events"] = (start, end)
            else:
                t = time.perf_counter()
                out = launch(batch, *args, **kwargs)
                step["wall"] = time.perf_counter() - t
            self.steps.append(step)
            return out

        return timed

    def breakdown(
        self, weight_bytes: int, kv_token_bytes: int, bandwidth: float | None, moe: "MoeShape | None" = None
    ) -> dict[str, Any]:
        """Prefill and decode GPU seconds, the decode floor and efficiency per batch-size bucket, and the
        GPU's idle time between steps (an MoE step reads the experts its batch activates, as the limit
        counts them). Call after the GPU has finished."""

        def step_weights(rows: int) -> float:
            return moe.step_weight_bytes(weight_bytes, rows) if moe else weight_bytes

        idle = 0.0
        for step in self.steps:
            if self.cuda:
                start, end = step.pop("events")
                step["gpu_s"] = start.elapsed_time(end) / 1e3
                step["start"] = start
                step["end"] = end
            else:
                step["gpu_s"] = step.pop("wall")
        if self.cuda:
            for prev, cur in zip(self.steps, self.steps[1:]):
                idle += max(0.0, prev["end"].elapsed_time(cur["start"]) / 1e3)
            for step in self.steps:
                del step["start"], step["end"]
        prefill = [s for s in self.steps if s["prefill"]]
        decode = [s for s in self.steps if not s["prefill"]]
        buckets: list[dict[str, Any]] = []
        low = 1
        for high in (*BATCH_BUCKETS, None):
            inside = [s for s in decode if s["rows"] >= low and (high is None or s["rows"] <= high)]
            if inside:
                gpu = sum(s["gpu_s"] for s in inside)
                moved = sum(
                    step_weights(s["rows"]) + (s["context"] + s["rows"]) * kv_token_bytes for s in inside
                )
                floor = moved / bandwidth if bandwidth else None
                buckets.append(
                    {
                        "batch": f"{low}-{high}" if high else f">{low - 1}",
                        "steps": len(inside),
                        "gpu_s": gpu,
                        "floor_s": floor,
                        "efficiency": floor / gpu if floor and gpu > 0 else None,
                    }
                )
            low = (high or 0) + 1
        decode_gpu = sum(s["gpu_s"] for s in decode)
        decode_floor = sum(b["floor_s"] for b in buckets) if bandwidth else None
        return {
            "timing": "CUDA events around each launch" if self.cuda else "wall time of each launch",
            "prefill_steps": len(prefill),
            "prefill_s": sum(s["gpu_s"] for s in prefill),
            "decode_steps": len(decode),
            "decode_gpu_s": decode_gpu,
            "decode_floor_s": decode_floor,
            "decode_efficiency": decode_floor / decode_gpu if decode_floor and decode_gpu > 0 else None,
            "gpu_idle_between_steps_s": idle if self.cuda else None,
            "decode_buckets": buckets,
        }


def print_breakdown(b: dict[str, Any]) -> None:
    eff = f" ({b['decode_efficiency']:.0%} of it)" if b["decode_efficiency"] else ""
    floor = f" against a {b['decode_floor_s']:.2f} s floor{eff}" if b["decode_floor_s"] else ""
    idle = b["gpu_idle_between_steps_s"]
    print(
        f"Breakdown ({b['timing']}): prefill {b['prefill_steps']} steps {b['prefill_s']:.2f} s; decode "
        f"{b['decode_steps']} steps {b['decode_gpu_s']:.2f} s{floor}"
        + (f"; GPU idle between steps {idle:.3f} s" if idle is not None else "")
    )
    print(f"  {'decode batch':>12} {'steps':>6} {'time s':>8} {'floor s':>8} {'efficiency':>10}")
    for row in b["decode_buckets"]:
        floor = f"{row['floor_s']:8.3f}" if row["floor_s"] is not None else f"{'-':>8}"
        eff = f"{row['efficiency']:10.0%}" if row["efficiency"] is not None else f"{'-':>10}"
        print(f"  {row['batch']:>12} {row['steps']:>6} {row['gpu_s']:8.3f} {floor} {eff}")


def run_nanovllm(args: argparse.Namespace, path: str, wl: Workload) -> Result:
    from nanovllm import LLM, SamplingParams

    names = (
        "max_model_len",
        "enforce_eager",
        "device",
        "dtype",
        "attention_backend",
        "gpu_memory_utilization",
        "kvcache_block_size",
        "tensor_parallel_size",
        "quantization",
        "kv_cache_dtype",
    )
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in names}
    kwargs["overlap_scheduling"] = not args.no_overlap
    if builtin_model.builtin_load_format(path):  # a built-in checkpoint without weight files
        kwargs["load_format"] = builtin_model.builtin_load_format(path)
    llm = LLM(path, **kwargs)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in wl.max_tokens]
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    step_tokens: list[int] = []
    engine_step = llm._step

    def counting_step():  # generate() runs self._step(): note each step's token count
        out = engine_step()
        step_tokens.append(out[-1])
        return out

    llm._step = counting_step
    runner = llm.model_runner
    timeline = StepTimeline(torch.cuda.is_available() and str(args.device) != "cpu")
    if not args.no_breakdown:
        runner.launch = timeline.wrap(runner.launch)
    _sync()
    start = time.perf_counter()
    outputs = llm.generate(wl.prompts, params, use_tqdm=False)
    _sync()
    seconds = time.perf_counter() - start
    del llm._step
    if not args.no_breakdown:
        del runner.launch
    prefill = [n for n in step_tokens if n > 0]
    decode = [-n for n in step_tokens if n < 0]
    details = {
        "attention_backend": runner.backend.name,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "elem_size": torch.empty(0, dtype=runner.dtype).element_size(),
        "kv_elem_size": runner.kv_cache_dtype.itemsize,  # 1 with kv_cache_dtype fp8
        "weight_bytes": param_bytes(runner.model),  # rank 0's shard: what one GPU reads per step
        "weight_count": weight_count(runner.model),
        "memory": memory_stats(),
        "engine_config": {
            f.name: getattr(llm.config, f.name)
            for f in dataclasses.fields(llm.config)
            if f.name != "hf_config"
        },
        "steps": {"prefill_tokens_per_step": summary(prefill), "decode_batch_size": summary(decode)},
        "timeline": None if args.no_breakdown else timeline,
    }
    llm.exit()
    return seconds, sum(len(o["token_ids"]) for o in outputs), details


def run_hf(args: argparse.Namespace, path: str, wl: Workload) -> Result:
    """transformers' continuous batching (ContinuousBatchingManager): greedy, EOS disabled (-1)."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    device = _device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype != "auto"
        else torch.float32
        if device.type == "cpu"
        else torch.bfloat16
    )
    if args.attention_backend == "flash-attn":
        attn = "flash_attention_2"
    else:  # transformers 5.17 calls paged SDPA "paged|sdpa"; 5.24 dropped the prefix ("sdpa" is paged there)
        attn = "paged|sdpa" if "paged|sdpa" in ALL_ATTENTION_FUNCTIONS else "sdpa"
    if builtin_model.builtin_load_format(path) == "dummy":
        raise SystemExit(f"--engine hf needs weight files; {path} has none (it is for load_format='dummy')")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    no_flash = "flash" not in attn and "auto_switch_to_flash" in {
        f.name for f in dataclasses.fields(ContinuousBatchingConfig)
    }
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(wl.max_tokens), eos_token_id=-1)
    cb_config = ContinuousBatchingConfig(**({"auto_switch_to_flash": False} if no_flash else {}))
    init_kwargs: dict[str, Any] = {"generation_config": gen_config, "continuous_batching_config": cb_config}
    if "workload_hints" in inspect.signature(model.init_continuous_batching).parameters:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        init_kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(map(len, wl.prompts)),
            max_generated_length=max(wl.max_tokens),
            num_requests=len(wl.prompts),
        )
    manager = model.init_continuous_batching(**init_kwargs)
    eos = {"eos_token_id": -1} if "eos_token_id" in inspect.signature(manager.add_request).parameters else {}

    def run(prompts: list[list[int]], max_tokens: list[int], tag: str) -> int:
        for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
            manager.add_request(p, request_id=f"{tag}{i}", max_new_tokens=m, **eos)
        done = generated = 0
        while done < len(prompts):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped before all requests finished")
            if result is None or not result.is_finished():
                continue
            if result.error:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            done, generated = done + 1, generated + len(result.generated_tokens)
        return generated

    if hasattr(manager, "warmup"):
        manager.warmup()
    manager.start()
    try:
        run([[1, 2, 3, 4]], [8], "warmup_")
        _sync()
        start = time.perf_counter()
        generated = run(wl.prompts, wl.max_tokens, "req_")
        _sync()
        seconds = time.perf_counter() - start
        mem = memory_stats()
    finally:
        manager.stop(block=True)
    return (
        seconds,
        generated,
        {
            "attention_backend": f"transformers:{attn}",
            "dtype": str(dtype).removeprefix("torch."),
            "elem_size": torch.empty(0, dtype=dtype).element_size(),
            "weight_bytes": param_bytes(model),
            "memory": mem,
        },
    )


def run_vllm(args: argparse.Namespace, path: str, wl: Workload) -> Result:
    from vllm import LLM as VLLM
    from vllm import SamplingParams as VSP

    llm = VLLM(
        path,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        **({"load_format": "dummy"} if builtin_model.builtin_load_format(path) == "dummy" else {}),
    )
    params = [VSP(temperature=0.6, ignore_eos=True, max_tokens=m) for m in wl.max_tokens]
    llm.generate(["Benchmark: "], VSP(), use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    _sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    seconds = time.perf_counter() - start
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    if not weights:  # dummy weights: count vLLM's parameters as ours would be counted
        weights = meta_param_bytes(path, 4 if args.dtype == "float32" else 2)
    return (
        seconds,
        sum(len(o.outputs[0].token_ids) for o in outputs),
        {
            "attention_backend": "vllm",
            "dtype": args.dtype,
            "elem_size": 4 if args.dtype == "float32" else 2,
            "kv_elem_size": 1
            if args.kv_cache_dtype.startswith("fp8")
            else (4 if args.dtype == "float32" else 2),
            "weight_bytes": weights // args.tensor_parallel_size,
            "memory": memory_stats(),
        },
    )


# ---- reporting ---------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        run = dict(cwd=REPO, capture_output=True, text=True, check=True, timeout=30)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"], **run).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "transformers", "flash_attn", "vllm"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def resolve_model(name: str) -> str:
    path = os.path.expanduser(name)
    if name in BUILTIN_MODELS or (name == DEFAULT_MODEL and not os.path.isdir(path)):
        path = builtin_model.get_builtin_model(name if name in BUILTIN_MODELS else "qwen3-0.6b-random")
        if name == DEFAULT_MODEL:
            print(f"{name} does not exist: using the random-weight Qwen3-0.6B checkpoint at {path}")
    return path


# Output tokens above which a run on a CPU is refused unless --cpu-ok: the reference workload on
# Qwen3-0.6B shapes would take hours there, with no output until the end.
CPU_OUTPUT_TOKENS_LIMIT = 20_000
SMALL_CPU_RUN = "--model tiny-qwen3 --num-seqs 8 --max-input-len 64 --max-output-len 32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model directory, or a built-in random checkpoint built on first use: "
        f"{', '.join(BUILTIN_MODELS)} (default: ~/huggingface/Qwen3-0.6B/, else qwen3-0.6b-random)",
    )
    p.add_argument(
        "--engine",
        choices=("nanovllm", "hf", "vllm"),
        default="nanovllm",
        help="nanovllm (this engine), hf (transformers' continuous batching) or vllm (when installed)",
    )
    p.add_argument("--num-seqs", type=int, default=REFERENCE["num_seqs"], help="requests (reference: 256)")
    p.add_argument(
        "--max-input-len",
        type=int,
        default=REFERENCE["max_input_len"],
        help="longest prompt (reference: 1024)",
    )
    p.add_argument(
        "--max-output-len",
        type=int,
        default=REFERENCE["max_output_len"],
        help="largest max_tokens (reference: 1024)",
    )
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N", help="common first N prompt tokens")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--attention-backend",
        choices=("auto", "triton", "flash-attn", "torch"),
        default="auto",
        help="attention implementation (auto: flash-attn if it imports, else triton on CUDA)",
    )
    p.add_argument("--no-overlap", action="store_true", help="overlap scheduling off, if the engine has it")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="compute dtype (auto: the checkpoint's on GPU, float32 on CPU)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use")
    p.add_argument("--max-model-len", type=int, default=4096, help="longest sequence the engine accepts")
    p.add_argument("--kvcache-block-size", type=int, default=256, help="tokens per KV-cache block")
    p.add_argument(
        "--quantization",
        default=None,
        help="weight quantization (vLLM's name): unset serves the checkpoint as it is; 'fp8' quantizes a "
        "bf16 checkpoint at load (nanovllm and vllm only)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8", "fp8_e4m3"),
        default="auto",
        help="KV-cache element type; fp8 halves the KV bytes the limit counts (nanovllm and vllm only)",
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs to shard the model over (not hf)"
    )
    p.add_argument(
        "--cpu-ok",
        action="store_true",
        help=f"run on a CPU even a workload of more than {CPU_OUTPUT_TOKENS_LIMIT:,} output tokens",
    )
    p.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the per-step timing (CUDA events around each launch) behind the breakdown",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def refuse_slow_cpu_run(args: argparse.Namespace) -> None:
    """Exit with a suggestion when a run would take hours on a CPU (before any checkpoint is built)."""
    if _device(args.device).type != "cpu" or args.cpu_ok:
        return
    wl = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    if wl.output_tokens <= CPU_OUTPUT_TOKENS_LIMIT and args.model != DEFAULT_MODEL:
        return
    print(
        f"bench.py: no GPU here, and this run ({len(wl.prompts)} requests, {wl.output_tokens:,} output tokens"
        f"{', Qwen3-0.6B shapes' if args.model == DEFAULT_MODEL else ''}) would take hours on a CPU with no "
        f"output until the end. For a quick functional run try:\n  python bench.py {SMALL_CPU_RUN}\n"
        "or pass --cpu-ok to run it anyway.",
        file=sys.stderr,
    )
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refuse_slow_cpu_run(args)
    if args.engine == "hf" and args.tensor_parallel_size != 1:
        print("--engine hf runs on one device; leave --tensor-parallel-size at 1", file=sys.stderr)
        sys.exit(2)
    if args.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vLLM is not installed (pip install vllm); use --engine nanovllm or hf", file=sys.stderr)
            sys.exit(2)
    from transformers import AutoConfig

    path = resolve_model(args.model)
    cfg = AutoConfig.from_pretrained(path)
    random_weights = os.path.isfile(os.path.join(path, "nanovllm_builtin.json"))
    wl = make_workload(
        args.num_seqs, args.max_input_len, args.max_output_len, args.shared_prefix, cfg.vocab_size
    )
    reference = all(getattr(args, k) == v for k, v in REFERENCE.items())
    if reference:
        assert (wl.output_tokens, wl.prompt_tokens) == REFERENCE_TOKENS, "the reference workload drifted"
    print(
        f"Workload: {len(wl.prompts)} requests, {wl.prompt_tokens:,} prompt tokens, {wl.output_tokens:,} "
        f"output tokens{' (reference)' if reference else ''}, shared prefix {args.shared_prefix}"
    )
    device = _device(args.device)
    bandwidth = copy_bandwidth(device)
    print(
        "Copy bandwidth: "
        + (
            f"{human(bandwidth, 'B/s')} (1 GiB device copy, read + write, median of 10)"
            if bandwidth
            else f"not measured on {device.type} (CUDA only)"
        )
    )

    engine = {"nanovllm": run_nanovllm, "hf": run_hf, "vllm": run_vllm}[args.engine]
    seconds, generated, details = engine(args, path, wl)
    if generated != wl.output_tokens:
        raise RuntimeError(f"the engine generated {generated} tokens, expected {wl.output_tokens}")
    throughput = wl.output_tokens / seconds

    tp = args.tensor_parallel_size
    kv_token = kv_bytes_per_token(cfg, details.get("kv_elem_size", details["elem_size"]), tp)
    moe = moe_shape(cfg, details["elem_size"], tp)
    parts = decode_bytes(wl, details["weight_bytes"], kv_token, moe)
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # Per token an MoE model multiplies by top_k of its experts, not all of them.
    inactive = moe.sparse_layers * (moe.num_experts - moe.top_k) * moe.expert_params if moe else 0
    # Per GPU: the whole model's prefill matmuls split N ways (the replicated norms are negligible).
    weights = details.get("weight_count", details["weight_bytes"] // details["elem_size"])
    active_params = tp * weights - embedding - inactive
    tflop = prefill_tflop(wl, cfg, active_params) / tp
    timeline = details.pop("timeline", None)
    breakdown = timeline.breakdown(details["weight_bytes"], kv_token, bandwidth, moe) if timeline else None
    floor_s = parts["total"] / bandwidth if bandwidth else None
    limit = wl.output_tokens / floor_s if floor_s else None
    limit_prefill = wl.output_tokens / (floor_s + tflop / PREFILL_TFLOPS) if floor_s else None
    print(
        f"Decode must move {human(parts['total'])}{' per GPU' if tp > 1 else ''} in {parts['steps']} steps: "
        f"weights "
        f"{human(details['weight_bytes'])} x {parts['steps']}{' (active experts)' if moe else ''} = "
        f"{human(parts['weights'])} + KV read "
        f"{human(parts['kv_read'])} + KV write {human(parts['kv_write'])} ({kv_token:,} B/token, "
        f"{details['dtype']}{', fp8 KV cache' if args.kv_cache_dtype != 'auto' else ''}); prefill is "
        f"~{tflop:.3g} TFLOP of matmuls"
    )
    if moe:
        print(
            f"Mixture of experts: {moe.sparse_layers} sparse layers x {moe.num_experts} experts of "
            f"{human(moe.expert_bytes)}{' per GPU' if tp > 1 else ''}, top-{moe.top_k}; a step reads the "
            f"experts its batch activates (uniform routing: {moe.active_experts(1):.0f} at batch 1, "
            f"{moe.active_experts(16):.1f} at 16, {moe.active_experts(256):.2f} at 256), so the weights "
            f"average {human(parts['weights'] / max(1, parts['steps']))} per step"
        )
    if floor_s:
        print(
            f"Floor {floor_s:.2f} s: limit {limit:,.0f} tok/s ({limit_prefill:,.0f} tok/s counting prefill "
            f"at {PREFILL_TFLOPS:.0f} TFLOP/s); achieved {throughput / limit:.1%} of the limit"
        )
    mem = details.get("memory")
    if mem:
        print(
            f"GPU memory: peak allocated {mem['max_memory_allocated'] / 2**30:.2f} GiB, in use at the end "
            f"{mem['used_total_minus_free'] / 2**30:.2f} of {mem['total'] / 2**30:.2f} GiB "
            f"(gpu_memory_utilization {args.gpu_memory_utilization})"
        )
    print(
        f"Engine {args.engine}, attention {details['attention_backend']}, {details['dtype']}, "
        f"tensor_parallel_size {tp}, model {path}" + (" (random weights)" if random_weights else "")
    )
    if args.json:
        result = {
            "engine": args.engine,
            "model": path,
            "random_weights": random_weights,
            "options": vars(args),
            "total_tokens": wl.output_tokens,
            "prompt_tokens": wl.prompt_tokens,
            "seconds": seconds,
            "tok_per_s": throughput,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": versions(),
            "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bandwidth": {
                "copy_bytes_per_s": bandwidth,
                "kv_bytes_per_token": kv_token,
                "weight_bytes": details["weight_bytes"],
                "decode_bytes": parts,
                "floor_s": floor_s,
                "limit_tok_per_s": limit,
                "fraction_of_limit": limit and throughput / limit,
                "prefill_tflop": tflop,
                "limit_with_prefill_tok_per_s": limit_prefill,
                "moe": dataclasses.asdict(moe) if moe else None,
            },
            "memory": mem,
            "breakdown": breakdown,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "attention_backend": details["attention_backend"],
            **{k: details[k] for k in ("dtype", "steps", "engine_config") if k in details},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"Wrote {args.json}")
    print(f"Total: {wl.output_tokens}tok, Time: {seconds:.2f}s, Throughput: {throughput:.2f}tok/s")
    if breakdown:
        print_breakdown(breakdown)


if __name__ == "__main__":
    main()
