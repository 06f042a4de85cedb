"""The engine on an NVIDIA GPU: every attention backend, CUDA graphs, against transformers and each other."""

import subprocess
import sys

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.attention.selector import flash_attn_available
from nanovllm.engine.scheduler import Scheduler
from tests.conftest import (
    assert_greedy_matches_hf,
    hf_greedy,
    load_hf_model,
    random_prompts,
    write_hf_checkpoint,
)

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
BACKENDS = ["triton", "torch"] + (["flash-attn"] if flash_attn_available() else [])


@pytest.fixture(scope="module")
def model_d128(tmp_path_factory):
    """head_dim 128 (what the trimmed flash-attn build supports), 8 query heads over 2 KV heads."""
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("qwen3_d128"),
        seed=3,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=2048,
    )


def record_logits(llm: LLM) -> list[torch.Tensor]:
    """Capture the logits of every step (a wrapper around the runner's run_model)."""
    store: list[torch.Tensor] = []
    runner = llm.model_runner
    inner = runner.run_model

    def wrapped(*args, **kwargs):
        logits, prompt_logits = inner(*args, **kwargs)
        store.append(logits.float().cpu())
        return logits, prompt_logits

    runner.run_model = wrapped
    return store


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_greedy_equals_transformers(qwen3_tied, hf_tied, backend):
    prompts = random_prompts(6, [3, 17, 33, 1, 60, 120])
    llm = LLM(
        qwen3_tied,
        device="cuda",
        dtype="float32",
        attention_backend=backend,
        kvcache_block_size=16,
        num_kvcache_blocks=128,
    )
    assert_greedy_matches_hf(llm, hf_tied, prompts, GREEDY.max_tokens)
    llm.exit()


def test_fp32_prefix_cache_preemption_and_chunking(qwen3_tied, hf_tied, monkeypatch):
    preempted = []
    original = Scheduler.preempt
    monkeypatch.setattr(
        Scheduler, "preempt", lambda self, seq: (preempted.append(seq.seq_id), original(self, seq))
    )
    shared = random_prompts(1, [48], seed=7)[0]
    prompts = [shared + t for t in random_prompts(4, [5, 9, 20, 30], seed=8)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(
        qwen3_tied,
        device="cuda",
        dtype="float32",
        attention_backend="triton",
        kvcache_block_size=16,
        num_kvcache_blocks=9,
        max_num_batched_tokens=40,
    )
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert preempted, "expected the 9-block cache to force a preemption"
    for prompt, out in zip(prompts, first + rest):
        assert out["token_ids"] == hf_greedy(hf_tied, prompt, params.max_tokens)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.exit()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_graphs_give_eager_tokens(model_d128, backend, dtype):
    prompts = random_prompts(20, [5, 40, 300, 700], vocab=512, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(
            model_d128,
            device="cuda",
            dtype=dtype,
            attention_backend=backend,
            enforce_eager=eager,
            kvcache_block_size=256,
            num_kvcache_blocks=64,
            max_num_seqs=32,
        )
        assert (llm.model_runner.graph_runner is None) == eager
        results.append([o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)])
        llm.exit()
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backends_agree(model_d128, dtype):
    """Same prompts through every backend: per-step logits close while the greedy tokens agree."""
    prompts = random_prompts(6, [7, 100, 257, 600], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    for backend in BACKENDS:
        llm = LLM(
            model_d128,
            device="cuda",
            dtype=dtype,
            attention_backend=backend,
            enforce_eager=True,
            kvcache_block_size=256,
            num_kvcache_blocks=32,
        )
        logits = record_logits(llm)
        tokens = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        runs[backend] = (tokens, logits)
        llm.exit()
    ref_tokens, ref_logits = runs["torch"]
    for backend, (tokens, logits) in runs.items():
        same = sum(a == b for a, b in zip(tokens, ref_tokens))
        assert same >= len(prompts) - 1, (
            f"{backend}: {same}/{len(prompts)} completions equal the torch backend's"
        )
        # The first step (prefill) sees identical inputs: logits must be close.
        torch.testing.assert_close(
            logits[0], ref_logits[0], rtol=0.05, atol=0.05 * ref_logits[0].abs().max().item()
        )


def test_bf16_logits_close_to_transformers(model_d128):
    prompt = random_prompts(1, [90], seed=4)[0]
    llm = LLM(
        model_d128,
        device="cuda",
        dtype="bfloat16",
        attention_backend="triton",
        kvcache_block_size=256,
        num_kvcache_blocks=8,
    )
    logits = record_logits(llm)
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    hf = load_hf_model(model_d128)
    full = torch.tensor([prompt + out[0]["token_ids"]])
    with torch.no_grad():
        ref = hf(full).logits[0, len(prompt) - 1 :]  # fp32 reference at each sampled position
    for step, ours in enumerate(logits):
        scale = ref[step].abs().max().item()
        assert (ours[0] - ref[step]).abs().max().item() < 0.05 * scale, f"step {step}"
    llm.exit()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_unused_cache_slots_is_ignored(qwen3_tied, hf_tied, backend):
    prompts = random_prompts(4, [5, 20, 33, 70], seed=12)
    llm = LLM(
        qwen3_tied,
        device="cuda",
        dtype="float32",
        attention_backend=backend,
        kvcache_block_size=16,
        num_kvcache_blocks=64,
    )
    llm.model_runner.kv_cache.fill_(float("nan"))
    assert_greedy_matches_hf(llm, hf_tied, prompts, GREEDY.max_tokens)
    llm.exit()


def test_flash_attn_refuses_small_blocks(qwen3_tied):
    if not flash_attn_available():
        with pytest.raises(ValueError, match="flash_attn package does not import"):
            LLM(qwen3_tied, device="cuda", attention_backend="flash-attn")
    else:
        with pytest.raises(ValueError, match="multiple of 256"):
            LLM(qwen3_tied, device="cuda", attention_backend="flash-attn", kvcache_block_size=16)


def test_kv_cache_sized_from_gpu_memory(qwen3_tied):
    # A fresh process, so memory cached by earlier tests does not count as used.
    script = (
        "import torch\n"
        "from nanovllm import LLM\n"
        f"llm = LLM({qwen3_tied!r}, device='cuda', kvcache_block_size=256, gpu_memory_utilization=0.3,"
        " max_num_seqs=16, max_model_len=1024)\n"
        "free, total = torch.cuda.mem_get_info()\n"
        "print(llm.config.num_kvcache_blocks, (total - free) / total)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    blocks, used = out.stdout.split()[-2:]
    assert int(blocks) > 100
    # The CUDA context is outside PyTorch's accounting: a little slack. Not far below either: the warm-up's
    # activations are counted once (as the peak), not also as memory in use.
    assert 0.25 <= float(used) <= 0.31


@pytest.fixture
def compiled_ops():
    from nanovllm.utils.compile import enable_compilation

    enable_compilation()  # what every CUDA engine does at start-up (process-wide)


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("truncate", [False, True])
def test_sampler_distribution_on_gpu(compiled_ops, seeded, truncate):
    """The sampler on the GPU (the draw and threshold kernels, both noise sources) draws from the right
    distribution."""
    from nanovllm.layers.sampler import Sampler, SamplingTensors

    torch.manual_seed(0)
    n, dev = 30000, torch.device("cuda")
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25], device=dev)
    logits = probs.log().expand(n, -1).to(torch.bfloat16).contiguous()
    params = SamplingTensors(torch.ones(n, device=dev))
    expected = probs.double().cpu()
    if seeded:
        params.keys = torch.randint(0, 2**32, (n, 2), device=dev, dtype=torch.int64)
    if truncate:  # top-p 0.7 keeps tokens 1 and 3
        params.top_k = torch.full((n,), 4, device=dev)
        params.top_p = torch.full((n,), 0.7, device=dev)
        params.min_p = torch.zeros(n, device=dev)
        expected = torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75], dtype=torch.double)
    freq = torch.bincount(Sampler()(logits, params).cpu(), minlength=4).double() / n
    assert torch.allclose(freq, expected, atol=0.015), freq


def test_sampling_api_on_gpu(model_d128):
    """top-k 1 equals greedy, and a seeded truncated request gives the same tokens alone and in a
    batch, through CUDA graphs and the sampler's kernels; logprobs come back."""
    llm = LLM(model_d128, device="cuda", dtype="bfloat16", kvcache_block_size=256, num_kvcache_blocks=32)
    prompts = random_prompts(5, [5, 40, 130], seed=41)
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=16, ignore_eos=True)
    assert [o["token_ids"] for o in llm.generate(prompts, top1, use_tqdm=False)] == [
        o["token_ids"] for o in greedy
    ]
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=7, max_tokens=24, ignore_eos=True, logprobs=2
    )
    alone = llm.generate(prompts[:1], seeded, use_tqdm=False)[0]
    hot = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    batch = llm.generate(prompts, [seeded] + [hot] * 4, use_tqdm=False)
    assert batch[0]["token_ids"] == alone["token_ids"]
    assert len(alone["logprobs"]) == 24
    for token, step in zip(alone["token_ids"], alone["logprobs"]):
        assert token in step and all(v.logprob <= 0 and v.rank >= 1 for v in step.values())
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.exit()


def test_vllm_sampling_fields_on_cuda_equal_the_cpu_engine(qwen3_tied):
    """n (forks with their KV block copy), penalties, logit_bias, allowed_token_ids, min_tokens, prompt and
    sample logprobs on CUDA, with CUDA graphs: the same greedy tokens as the CPU engine."""
    prompts = random_prompts(3, [5, 21, 40], seed=12)
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=3, logprobs=2, prompt_logprobs=1),
        SamplingParams(
            temperature=0.0,
            max_tokens=12,
            ignore_eos=True,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.3,
            logit_bias={7: 3.0},
        ),
        SamplingParams(
            temperature=0.0,
            max_tokens=12,
            ignore_eos=True,
            allowed_token_ids=[3, 9, 27, 81, 243],
            min_tokens=4,
        ),
    ]
    config = dict(kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256, dtype="float32")
    outputs = {}
    for device in ("cpu", "cuda"):
        with LLM(qwen3_tied, device=device, **config) as llm:
            outputs[device] = llm.generate(prompts, params, use_tqdm=False)
            assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    for cpu, gpu in zip(outputs["cpu"], outputs["cuda"]):
        assert [c.token_ids for c in gpu.outputs] == [c.token_ids for c in cpu.outputs]
    cpu, gpu = outputs["cpu"][0], outputs["cuda"][0]
    for a, b in zip(cpu.prompt_logprobs[1:], gpu.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-3 for t in a)
