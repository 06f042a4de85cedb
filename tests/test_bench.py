"""bench.py keeps working (a functional check on the CPU; speed is measured on a GPU, never in tests)."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_the_workload_and_writes_json(qwen3_tied, tmp_path):
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
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"Total: (\d+)tok, Time: [\d.]+s, Throughput: [\d.]+tok/s", last)
    assert match, last
    data = json.loads(out.read_text())
    assert data["total_tokens"] == int(match.group(1)) > 0
    assert data["steps"]["prefill_tokens_per_step"]["sum"] == data["prompt_tokens"]
    assert data["steps"]["decode_batch_size"]["steps"] > 0
