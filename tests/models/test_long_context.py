"""Long-context features end to end against transformers' own models with the same random weights:
yarn (Qwen3), dynamic NTK and longrope (Llama) with prompts several times the original context, and
sliding windows (Mistral on every layer, Qwen2 on some layers) with prompts several windows long,
chunked prefill, prefix-cache hits and preemption. Greedy tokens equal, logits close."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.context import AttentionMetadata
from tests.conftest import hf_greedy, load_hf_model, random_prompts, write_hf_checkpoint

ORIGINAL = 64  # the original context of the rope-scaled checkpoints
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL)
DYNAMIC = dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)
LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    long_factor=[1.0 + 0.5 * i for i in range(8)],
    short_factor=[1.0 + 0.05 * i for i in range(8)],
    original_max_position_embeddings=ORIGINAL,
)
WINDOW = 32

CHECKPOINTS = {
    # name -> (architecture, config overrides)
    "qwen3_yarn": ("Qwen3ForCausalLM", dict(rope_parameters=YARN, max_position_embeddings=4 * ORIGINAL)),
    "llama_dynamic": ("LlamaForCausalLM", dict(rope_parameters=DYNAMIC, max_position_embeddings=ORIGINAL)),
    "llama_longrope": (
        "LlamaForCausalLM",
        dict(rope_parameters=LONGROPE, max_position_embeddings=4 * ORIGINAL),
    ),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=WINDOW)),
    "mistral_window16": ("MistralForCausalLM", dict(sliding_window=16)),
    # layer 0 sees the whole context, layer 1 the last 16 tokens
    "qwen2_mixed": (
        "Qwen2ForCausalLM",
        dict(layer_types=["full_attention", "sliding_attention"], sliding_window=16, use_sliding_window=True),
    ),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    arch, overrides = CHECKPOINTS[request.param]
    return write_hf_checkpoint(tmp_path_factory.mktemp(request.param), arch=arch, seed=11, **overrides)


def our_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """Logits at every position of one prompt through the engine's model, no KV cache (a
    length-dependent rope rotates every prompt token by the prompt's length)."""
    n = len(prompt)
    cu = torch.tensor([0, n], dtype=torch.int32)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.full((n,), -1),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=n,
        max_seqlen_k=n,
        seqlens_q=[n],
        seqlens_k=[n],
        rope_lengths=torch.full((n,), n, dtype=torch.int64),
    )
    model = llm.model_runner.model
    with torch.inference_mode(), llm.model_runner.forward_context.set(meta):
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(n)))


def hf_reference(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy completions, a fresh model per prompt (dynamic rope keeps state between
    forward passes: a second prompt would start from the first one's frequencies)."""
    return [hf_greedy(load_hf_model(path), p, max_tokens) for p in prompts]


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("checkpoint", ["qwen3_yarn", "llama_dynamic", "llama_longrope"], indirect=True)
def test_rope_scalings_far_past_the_original_length(checkpoint):
    """Prompts up to 3.5x the original context, decoding past it; whole-prompt and chunked prefill."""
    prompts = random_prompts(3, [40, 3 * ORIGINAL + 7, int(3.5 * ORIGINAL)], seed=5)
    expected = hf_reference(checkpoint, prompts, 12)
    llm = LLM(checkpoint, num_kvcache_blocks=64, kvcache_block_size=16)
    try:
        assert llm.model_runner.config.max_model_len == 4 * ORIGINAL  # the scaled limit, not 64
        assert greedy(llm, prompts) == expected
        hf = load_hf_model(checkpoint)
        with torch.no_grad():
            ref = hf(torch.tensor([prompts[1]])).logits[0]
        torch.testing.assert_close(our_logits(llm, prompts[1]), ref, rtol=1e-4, atol=1e-4)
    finally:
        llm.exit()
    chunked = LLM(checkpoint, num_kvcache_blocks=64, kvcache_block_size=16, max_num_batched_tokens=48)
    try:
        assert greedy(chunked, prompts) == expected
    finally:
        chunked.exit()


@pytest.mark.parametrize("checkpoint", ["qwen3_yarn"], indirect=True)
def test_yarn_scaling_is_what_matches(checkpoint):
    """Without the scaling (a plain rope) the same weights give other logits: the test above does
    check yarn, and its attention factor."""
    llm = LLM(checkpoint, num_kvcache_blocks=16, kvcache_block_size=16)
    try:
        rope = llm.model_runner.model.model.layers[0].self_attn.rotary_emb
        assert rope is llm.model_runner.model.model.layers[1].self_attn.rotary_emb  # one shared table
        assert rope.scaling == pytest.approx(1.1386, abs=1e-4)
        prompt = random_prompts(1, [150], seed=2)[0]
        scaled = our_logits(llm, prompt)
        table = rope.cos_sin_cache
        try:
            rope.cos_sin_cache = table / rope.scaling  # drop the attention factor
            assert (our_logits(llm, prompt) - scaled).abs().max() > 1e-2
        finally:
            rope.cos_sin_cache = table
    finally:
        llm.exit()


@pytest.mark.parametrize("checkpoint", ["mistral_window", "qwen2_mixed"], indirect=True)
def test_sliding_windows_match_transformers(checkpoint):
    """Prompts several windows long, whole and chunked (chunks that start inside a window)."""
    prompts = random_prompts(3, [20, 4 * WINDOW + 5, 150], seed=9)
    expected = hf_reference(checkpoint, prompts, 12)
    hf = load_hf_model(checkpoint)
    for kwargs in (dict(), dict(max_num_batched_tokens=40)):
        llm = LLM(checkpoint, num_kvcache_blocks=48, kvcache_block_size=16, **kwargs)
        try:
            assert greedy(llm, prompts) == expected
            with torch.no_grad():
                ref = hf(torch.tensor([prompts[2]])).logits[0]
            torch.testing.assert_close(our_logits(llm, prompts[2]), ref, rtol=1e-4, atol=1e-4)
        finally:
            llm.exit()


@pytest.mark.parametrize("checkpoint", ["mistral_window"], indirect=True)
def test_window_model_memory_stays_bounded(checkpoint):
    """A window in every layer: blocks are taken chunk by chunk and released behind the window, so a
    cache of 8 blocks (128 tokens) serves a 200-token prompt and a 440-token sequence; the tokens equal
    transformers'. Blocks held while decoding stay at window / block size + 3 however long it grows."""
    prompt = random_prompts(1, [200], seed=4)[0]
    expected = hf_reference(checkpoint, [prompt], 240)[0]
    llm = LLM(checkpoint, num_kvcache_blocks=8, kvcache_block_size=16, max_num_batched_tokens=32)
    try:
        assert llm.block_manager.sliding_window == WINDOW
        held = {"prefill": [], "decode": []}
        llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True))
        finished = []
        while not llm.is_finished():
            done, num_tokens = llm.step()
            finished += done
            used = llm.block_manager.num_blocks - llm.block_manager.num_free_blocks
            held["prefill" if num_tokens > 0 else "decode"].append(used)
        assert finished[0][1] == expected
        assert len(held["decode"]) > 200 and max(held["decode"]) <= WINDOW // 16 + 3
        assert max(held["prefill"]) <= 8
        llm.block_manager.check_integrity()
    finally:
        llm.exit()


@pytest.mark.parametrize("checkpoint", ["mistral_window"], indirect=True)
def test_window_prefix_cache_hits_and_preemption(checkpoint):
    """A second prompt sharing a long prefix hits the cache (blocks released by the first are revived
    from the free list), and a small cache forces preemption; tokens still equal transformers'."""
    base = random_prompts(1, [100], seed=6)[0]
    prompts = [base + [7, 8, 9], base + [3, 1], random_prompts(1, [90], seed=8)[0]]
    expected = hf_reference(checkpoint, prompts, 30)
    llm = LLM(checkpoint, num_kvcache_blocks=64, kvcache_block_size=16)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        first = llm.generate([prompts[0]], params, use_tqdm=False)[0]
        assert first.outputs[0].token_ids == expected[0]
        second = llm.generate([prompts[1]], params, use_tqdm=False)[0]
        assert second.outputs[0].token_ids == expected[1]
        assert second.num_cached_tokens == 96  # six full blocks of the shared 100 tokens
    finally:
        llm.exit()
    short = random_prompts(3, [20, 25, 30], seed=13)  # admitted together, each growing to 5 blocks
    expected = hf_reference(checkpoint, short, 100)
    for overlap in (True, False):  # without overlap no step in flight can free blocks for a retry
        small = LLM(
            checkpoint,
            num_kvcache_blocks=7,
            kvcache_block_size=16,
            max_num_seqs=3,
            max_num_batched_tokens=32,
            overlap_scheduling=overlap,
        )
        preempted = []
        preempt = small.scheduler.preempt
        small.scheduler.preempt = lambda s, log=preempted, inner=preempt: (log.append(s.seq_id), inner(s))[1]
        try:
            assert greedy(small, short, 100) == expected
            assert preempted  # three windows of 3-4 blocks do not fit in 7
            small.block_manager.check_integrity()
        finally:
            small.exit()


@pytest.mark.parametrize(
    "device",
    [
        pytest.param({}, id="cpu"),
        *(
            pytest.param(
                dict(device="cuda", dtype="float32", attention_backend=b), marks=pytest.mark.cuda, id=b
            )
            for b in ("triton", "torch")
        ),
    ],
)
@pytest.mark.parametrize("checkpoint", ["mistral_window"], indirect=True)
def test_window_cached_prefix_longer_than_the_cache(checkpoint, device):
    """A prompt whose cached prefix is more blocks than the cache holds: the hits before its first
    query's window are not taken, so it runs in a cache just larger than one sequence's bound (with
    every hit taken it could never start); the tokens equal transformers' and an uncached run's. Run
    a second time, after its own blocks replaced the first prompt's, it still matches."""
    first = random_prompts(1, [112], seed=21)[0]
    longer = first + random_prompts(1, [100], seed=22)[0]
    expected = hf_reference(checkpoint, [first, longer], 8)
    llm = LLM(checkpoint, num_kvcache_blocks=8, kvcache_block_size=16, max_num_batched_tokens=32, **device)
    try:
        assert llm.block_manager.most_blocks_held(len(longer) + 8, 32) == 6
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outputs = []
        for prompt in (first, longer, longer):
            outputs.append(llm.generate([prompt], params, use_tqdm=False)[0])
        assert [o.outputs[0].token_ids for o in outputs] == [expected[0], expected[1], expected[1]]
        assert outputs[1].num_cached_tokens == 112  # all seven blocks of the first prompt hit
        llm.block_manager.check_integrity()
    finally:
        llm.exit()
    uncached = LLM(
        checkpoint,
        num_kvcache_blocks=8,
        kvcache_block_size=16,
        max_num_batched_tokens=32,
        enable_prefix_caching=False,
        **device,
    )
    try:
        assert greedy(uncached, [longer], 8) == [expected[1]]
    finally:
        uncached.exit()


@pytest.mark.parametrize("checkpoint", ["mistral_window16"], indirect=True)
def test_window_prompt_waits_while_the_last_running_sequence_preempts_itself(checkpoint):
    """Overlap off, a window of 16 in a cache of 4 blocks: a half-prefilled prompt cannot take its next
    chunk's blocks while the only running sequence, short of a block, preempts itself; the scheduler
    gives the freed blocks to the prompt in the same step instead of reporting nothing to run."""
    prompts = random_prompts(3, [108, 16, 120], seed=17)
    max_tokens = [100, 4, 88]
    expected = [hf_reference(checkpoint, [p], m)[0] for p, m in zip(prompts, max_tokens)]
    llm = LLM(
        checkpoint,
        num_kvcache_blocks=4,
        kvcache_block_size=16,
        max_num_batched_tokens=16,
        max_num_seqs=2,
        overlap_scheduling=False,
        enable_prefix_caching=False,
    )
    try:
        params = [
            SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, n=3 if i == 1 else 1)
            for i, m in enumerate(max_tokens)
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        got = [[c.token_ids for c in o.outputs] for o in outputs]
        assert got == [[expected[0]], [expected[1]] * 3, [expected[2]]]  # greedy completions agree
        llm.block_manager.check_integrity()
    finally:
        llm.exit()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "checkpoint", ["qwen3_yarn", "llama_dynamic", "mistral_window", "qwen2_mixed"], indirect=True
)
def test_long_context_on_gpu_matches_transformers(checkpoint, backend):
    """fp32 on the GPU (CUDA graphs for decode), chunked prefill, a cache small enough to preempt."""
    prompts = random_prompts(4, [40, 3 * ORIGINAL + 7, 150, 100], seed=12)
    expected = hf_reference(checkpoint, prompts, 24)
    llm = LLM(
        checkpoint,
        device="cuda",
        dtype="float32",
        attention_backend=backend,
        num_kvcache_blocks=40,
        kvcache_block_size=16,
        max_num_batched_tokens=64,
    )
    try:
        assert greedy(llm, prompts, 24) == expected
    finally:
        llm.exit()
