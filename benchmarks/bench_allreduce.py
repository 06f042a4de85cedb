"""What tensor parallelism's collectives cost per decode step, measured alone on the GPUs.

One decode step of a tensor-parallel model all-reduces a [batch, hidden] tensor 2 x layers + 1 times
(the vocabulary-parallel embedding, then each layer's attention output and MLP down projections) and
gathers the [batch, vocab / N] logit slices on rank 0. This script starts one process per GPU, captures
those all-reduces in one CUDA graph (the engine's decode graphs hold them the same way), times its
replays, and times the gather eagerly (the engine gathers outside the graph). Set the per-step figure
beside the decode step times of `benchmarks/profile_step.py` at N = 1 and N to see how much of the
difference the collectives explain.

Without GPUs it runs over gloo on the CPU, eagerly, as a functional check (the numbers mean little).

  python3 benchmarks/bench_allreduce.py --model qwen3-8b-random -tp 2 --json out.json
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_shape(name: str) -> dict[str, int]:
    """hidden_size, num_hidden_layers and vocab_size of a model directory or built-in model's config.
    A built-in model's configuration is read without building its checkpoint."""
    from nanovllm.utils.builtin_model import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        cfg = BUILTIN_MODELS[name][0]
    else:
        cfg = json.loads((Path(os.path.expanduser(name)) / "config.json").read_text())
    return {k: int(cfg[k]) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, iters: int, cuda: bool) -> float:
    """Median seconds of one `fn()` over `iters` runs (timed in blocks of 10 with CUDA events)."""
    times = []
    block = 10
    for _ in range(max(1, iters // block)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(block):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / block)
        else:
            t = time.perf_counter()
            for _ in range(block):
                fn()
            times.append((time.perf_counter() - t) / block)
    return statistics.median(times)


def _measure(args: argparse.Namespace, batch: int, rank: int, device: torch.device, cuda: bool) -> dict:
    n = args.tensor_parallel_size
    dtype = DTYPES[args.dtype]
    shape = args.shape
    per_step = 2 * shape["num_hidden_layers"] + 1
    x = torch.zeros(batch, shape["hidden_size"], dtype=dtype, device=device)
    for _ in range(3):  # NCCL sets up its channels on first use, outside any graph
        dist.all_reduce(x)

    def step_all_reduces():
        for _ in range(per_step):
            dist.all_reduce(x)

    step_fn = step_all_reduces
    if cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_all_reduces()
        step_fn = graph.replay
    dist.barrier()
    step_s = _time(step_fn, args.iters, cuda)
    dist.barrier()
    one_s = _time(lambda: dist.all_reduce(x), args.iters, cuda)  # eagerly: what prefill pays per call
    logits = torch.zeros(batch, shape["vocab_size"] // n, dtype=dtype, device=device)
    parts = [torch.empty_like(logits) for _ in range(n)] if rank == 0 else None
    dist.barrier()
    gather_s = _time(lambda: dist.gather(logits, parts, dst=0), args.iters, cuda)
    # Every rank's figures, the slowest reported: a collective ends when its last rank does.
    measured = torch.tensor([step_s, one_s, gather_s], dtype=torch.float64, device=device)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    step_s, one_s, gather_s = measured.tolist()
    nbytes = x.numel() * x.element_size()
    return {
        "batch": batch,
        "bytes": nbytes,
        "all_reduces_per_step": per_step,
        "graph_step_ms": 1e3 * step_s,
        "graph_us_per_all_reduce": 1e6 * step_s / per_step,
        "eager_us_per_all_reduce": 1e6 * one_s,
        # NCCL's "bus bandwidth" convention: data each GPU moves, 2 (N - 1) / N of the tensor.
        "graph_bus_gb_per_s": nbytes * 2 * (n - 1) / n / (step_s / per_step) / 1e9,
        "logits_gather_ms": 1e3 * gather_s,
    }


def _worker(rank: int, args: argparse.Namespace, port: int, cuda: bool) -> None:
    n = args.tensor_parallel_size
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=n,
        timeout=timedelta(seconds=120),
        **({"device_id": device} if cuda else {}),
    )
    rows = [_measure(args, batch, rank, device, cuda) for batch in args.batch_sizes]
    if rank == 0:
        report(args, rows, cuda)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, rows: list[dict], cuda: bool) -> None:
    name = torch.cuda.get_device_name(0) if cuda else "cpu (gloo)"
    s = args.shape
    print(
        f"{args.tensor_parallel_size} x {name}, {args.dtype}, hidden {s['hidden_size']}, "
        f"{s['num_hidden_layers']} layers, vocab {s['vocab_size']}: "
        f"{rows[0]['all_reduces_per_step']} all-reduces per decode step"
    )
    print(
        f"{'batch':>6}{'KiB':>8}{'step (graph) ms':>17}{'us / all-reduce':>17}{'eager us':>10}"
        f"{'bus GB/s':>10}{'gather ms':>11}"
    )
    for r in rows:
        print(
            f"{r['batch']:>6}{r['bytes'] / 1024:>8.0f}{r['graph_step_ms']:>17.3f}"
            f"{r['graph_us_per_all_reduce']:>17.2f}{r['eager_us_per_all_reduce']:>10.2f}"
            f"{r['graph_bus_gb_per_s']:>10.1f}{r['logits_gather_ms']:>11.3f}"
        )
    if args.json:
        from bench import git_commit, versions

        result = {
            "options": {k: v for k, v in vars(args).items() if k != "shape"},
            "shape": s,
            "device_name": name,
            "versions": versions(),
            "git_commit": git_commit(),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b-random", help="a model directory or built-in model name")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, help="default: every GPU")
    p.add_argument("--batch-sizes", default="1,16,64,128,256")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.shape = model_shape(args.model)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.tensor_parallel_size is None:
        args.tensor_parallel_size = torch.cuda.device_count() if cuda else 2
    n = args.tensor_parallel_size
    if n < 2:
        sys.exit("needs --tensor-parallel-size of 2 or more (and as many GPUs)")
    if cuda and n > torch.cuda.device_count():
        sys.exit(f"--tensor-parallel-size {n}, but this machine has {torch.cuda.device_count()} GPU(s)")
    mp.spawn(_worker, args=(args, _free_port(), cuda), nprocs=n, join=True)


if __name__ == "__main__":
    main()
