"""bench.py keeps working (a functional check on the CPU; speed is measured on a GPU, never in tests)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tp", [1, 2])
def test_bench_runs_the_workload_and_writes_json(qwen3_tied, tmp_path, tp):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench.py",
        "--model",
        qwen3_tied,
        "--num-seqs",
        "6",
        "--max-input-len",
        "30",
        "--max-output-len",
        "12",
        "--kvcache-block-size",
        "16",
        "--tensor-parallel-size",
        str(tp),
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    totals = [i for i, line in enumerate(lines) if line.startswith("Total: ")]
    assert len(totals) == 1, proc.stdout[-3000:]
    match = re.fullmatch(r"Total: (\d+)tok, Time: [\d.]+s, Throughput: [\d.]+tok/s", lines[totals[0]])
    assert match, lines[totals[0]]
    data = json.loads(out.read_text())
    assert data["total_tokens"] == int(match.group(1)) > 0
    assert data["steps"]["prefill_tokens_per_step"]["sum"] == data["prompt_tokens"]
    assert data["steps"]["decode_batch_size"]["steps"] > 0
    # The breakdown follows the throughput line and accounts for every step the engine ran.
    assert lines[totals[0] + 1].startswith("Breakdown (wall time of each launch): prefill ")
    b = data["breakdown"]
    assert b["prefill_steps"] == data["steps"]["prefill_tokens_per_step"]["steps"]
    assert b["decode_steps"] == data["steps"]["decode_batch_size"]["steps"]
    assert sum(row["steps"] for row in b["decode_buckets"]) == b["decode_steps"]
    assert b["decode_buckets"][0]["batch"] == "1-8"  # 6 requests: every decode step is in the first bucket
    assert 0 < b["decode_gpu_s"] and 0 < b["prefill_s"]
    assert data["engine_config"]["tensor_parallel_size"] == tp
    # One GPU's weights (what the floor counts): 1/tp of the model plus the small replicated norms.
    with safe_open(os.path.join(qwen3_tied, "model.safetensors"), framework="pt") as f:
        full = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    per_gpu = data["bandwidth"]["weight_bytes"] // 4  # float32
    assert full / tp <= per_gpu < full / tp + 1024


def test_bench_on_a_cpu_refuses_the_reference_run_and_suggests_a_small_one(tmp_path):
    # No model and no GPU: it must not build the 1.2 GB Qwen3-0.6B-shaped checkpoint and run for hours.
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "NANOVLLM_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        [sys.executable, "bench.py", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert "--model tiny-qwen3" in proc.stderr and "--cpu-ok" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_bench_help_documents_every_flag():
    proc = subprocess.run(
        [sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "SPEC.md" not in proc.stdout
    flags = re.findall(r"^  (--[a-z-]+)", proc.stdout, flags=re.M)
    assert len(flags) > 15
    for block in re.split(r"\n(?=  -)", proc.stdout.split("options:")[1])[1:]:
        assert len(block.split()) > 2 or "--help" in block, f"a flag without help: {block.strip()}"
