"""Tensor parallelism over NCCL on two or more NVIDIA GPUs, and engines side by side on separate GPUs."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts, write_hf_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two or more GPUs"
    ),
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def model_tp(tmp_path_factory):
    """head_dim 128 and untied embeddings (the LM head is sharded on its own), 8 query heads over 4 KV
    heads, so 2 and 4 GPUs each hold whole heads."""
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("qwen3_tp"),
        seed=5,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _prompts() -> list[list[int]]:
    base = random_prompts(6, [5, 40, 130, 1, 77, 300], seed=11)
    return base + [base[2][:128] + [3, 4]]  # shares 128 tokens (8 blocks of 16) with prompt 2


def _generate(model: str, **kwargs) -> list[list[int]]:
    llm = LLM(model, kvcache_block_size=16, max_model_len=1024, max_num_seqs=16, **kwargs)
    try:
        return [o["token_ids"] for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    finally:
        llm.exit()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_fp32_greedy_tokens_equal_tp1(model_tp, enforce_eager):
    common = dict(device="cuda", dtype="float32", attention_backend="triton", enforce_eager=enforce_eager)
    reference = _generate(model_tp, **common)
    sizes = [n for n in (2, 4) if n <= torch.cuda.device_count()]
    for n in sizes:
        assert _generate(model_tp, tensor_parallel_size=n, **common) == reference, f"tensor_parallel_size={n}"


def test_bf16_tp2_runs_and_agrees_on_first_tokens(model_tp):
    """bf16 rounds the partial sums differently when they are split over GPUs, so a greedy token may
    flip where two logits are close and the rest of that sequence then differs; the first tokens,
    which follow the prompts alone, must agree (one flip allowed)."""
    common = dict(device="cuda", dtype="bfloat16", attention_backend="triton")
    reference = _generate(model_tp, **common)
    tokens = _generate(model_tp, tensor_parallel_size=2, **common)
    assert [len(t) for t in tokens] == [len(t) for t in reference]
    first = [t[0] for t in tokens]  # the first token follows the prompt alone: no earlier flip can spread
    assert sum(a == b for a, b in zip(first, [t[0] for t in reference], strict=True)) >= len(first) - 1


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from nanovllm import LLM, SamplingParams
    from tests.engine.test_tp_gpu import _prompts

    model, index, barrier = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llm = LLM(model, device=f"cuda:{index}", dtype="float32", kvcache_block_size=16, max_model_len=1024,
              max_num_seqs=16,
              gpu_memory_utilization=0.85)
    open(f"{barrier}.{index}", "w").close()
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{barrier}.{i}") for i in (0, 1)):  # both engines exist: now run together
        assert time.monotonic() < deadline, "the other engine did not start"
        time.sleep(0.05)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    tokens = []
    for _ in range(3):
        tokens.append([o["token_ids"] for o in llm.generate(_prompts(), params, use_tqdm=False)])
    others = [d for d in range(torch.cuda.device_count()) if d != index]
    free, total = torch.cuda.mem_get_info(index)
    try:  # which GPUs the driver sees this process on (a stray CUDA context is outside PyTorch's view)
        import pynvml
        pynvml.nvmlInit()
        on_gpus = [
            d for d in range(pynvml.nvmlDeviceGetCount())
            if os.getpid() in [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(
                pynvml.nvmlDeviceGetHandleByIndex(d))]
        ]
    except Exception as e:  # no NVML here, or it cannot list processes
        on_gpus = repr(e)
    print(json.dumps({
        "tokens": tokens,
        "blocks": llm.config.num_kvcache_blocks,
        "used_fraction": 1 - free / total,
        "reserved_elsewhere": [torch.cuda.memory_reserved(d) for d in others],
        "on_gpus": on_gpus,
    }))
    llm.exit()
    """
)


def test_two_engines_on_different_gpus_at_once(model_tp, tmp_path):
    """Two processes, one engine on cuda:0 and one on cuda:1, each sizing its KV cache to 85% of its own
    GPU and generating at the same time: both finish with the same tokens, and neither puts memory on
    the other's GPU."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    barrier = str(tmp_path / "ready")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, model_tp, str(i), barrier],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    nvml_checked = 0
    for index, r in enumerate(results):
        if isinstance(r["on_gpus"], list) and r["on_gpus"]:  # NVML lists processes here (in a VM it may not)
            assert r["on_gpus"] == [index], r["on_gpus"]  # no context on the other GPU
            nvml_checked += 1
        assert r["tokens"][0] == r["tokens"][1] == r["tokens"][2]
        assert r["blocks"] > 1000  # the whole 85% of its own GPU, not what the other engine left over
        assert 0.8 < r["used_fraction"] < 0.9
        assert r["reserved_elsewhere"] == [0] * len(r["reserved_elsewhere"])
    assert results[0]["tokens"][0] == results[1]["tokens"][0]
    if not nvml_checked:
        warnings.warn(
            f"NVML did not list the engines' processes ({results[0]['on_gpus']}): stray CUDA "
            "contexts on the other GPU were not looked for",
            stacklevel=1,
        )
