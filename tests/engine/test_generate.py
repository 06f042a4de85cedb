"""End-to-end greedy generation against transformers, through prefix caching, preemption and chunking."""

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.scheduler import Scheduler
from tests.conftest import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(hf_tied):
    """Memoized transformers greedy completions."""
    cache: dict[tuple, list[int]] = {}

    def get(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = hf_greedy(hf_tied, prompt, n)
        return cache[key]

    return get


def run_steps(llm: LLM, prompts, params) -> tuple[dict[int, list[int]], int, int]:
    """Drive the engine with add_request/step; returns outputs by seq id, prefilled tokens, steps."""
    ids = [llm.add_request(p, params) for p in prompts]
    outputs, prefilled, steps = {}, 0, 0
    while not llm.is_finished():
        finished, num_tokens = llm.step()
        steps += 1
        prefilled += max(num_tokens, 0)
        outputs.update(dict(finished))
    return {i: outputs[i] for i in ids}, prefilled, steps


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_batch_matches_transformers(qwen3_tied, reference, overlap):
    prompts = random_prompts(5, [3, 17, 33, 1, 60])
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=64, overlap_scheduling=overlap)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == reference(prompt, GREEDY.max_tokens)
        # vLLM's default skip_special_tokens=True: special tokens are left out of the text
        assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_prefix_cache_hits_reduce_prefill_and_keep_outputs(qwen3_tied, reference, overlap):
    shared = random_prompts(1, [48], seed=7)[0]  # three full blocks of 16
    tails = random_prompts(3, [5, 9, 20], seed=8)
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=64, overlap_scheduling=overlap)
    first, prefilled_first, _ = run_steps(llm, [shared + tails[0]], GREEDY)
    second_prompts = [shared + t for t in tails[1:]]
    second, prefilled_second, _ = run_steps(llm, second_prompts, GREEDY)
    # Each second-round prompt reuses the 48 shared tokens computed by the first round.
    assert prefilled_second == sum(len(p) for p in second_prompts) - 2 * 48
    for prompt, out in zip(
        [shared + tails[0]] + second_prompts, list(first.values()) + list(second.values())
    ):
        assert out == reference(prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_identical_prompts_share_blocks_in_one_batch(qwen3_tied, reference):
    prompt = random_prompts(1, [40], seed=3)[0]
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=64)
    outputs, prefilled, _ = run_steps(llm, [prompt, prompt], GREEDY)
    assert prefilled == 40 + (40 - 32)  # the second copy hits the first copy's two full blocks
    for out in outputs.values():
        assert out == reference(prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_preemption_keeps_outputs(qwen3_tied, reference, monkeypatch, overlap):
    prompts = random_prompts(4, [20, 25, 30, 18], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    preempted = []
    original = Scheduler.preempt

    def spy(self, seq):
        preempted.append(seq.seq_id)
        original(self, seq)

    monkeypatch.setattr(Scheduler, "preempt", spy)
    # Each request needs 3 blocks of 16 at its longest; 7 blocks cannot hold all four.
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=7, overlap_scheduling=overlap)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert preempted, "the cache was meant to be too small: no preemption happened"
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == reference(prompt, params.max_tokens)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_chunked_prefill_keeps_outputs(qwen3_tied, reference, overlap):
    prompts = random_prompts(3, [50, 37, 9], seed=11)
    llm = LLM(
        qwen3_tied,
        kvcache_block_size=16,
        num_kvcache_blocks=64,
        max_num_batched_tokens=16,
        overlap_scheduling=overlap,
    )
    chunks = []
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    outputs = {}
    while not llm.is_finished():
        finished, num_tokens = llm.step()
        if num_tokens > 0:
            chunks.append(num_tokens)
        outputs.update(dict(finished))
    assert max(chunks) <= 16
    assert sum(chunks) == sum(len(p) for p in prompts)
    assert len(chunks) >= 7  # 96 prompt tokens in steps of at most 16
    for i, prompt in zip(ids, prompts):
        assert outputs[i] == reference(prompt, GREEDY.max_tokens)
    assert_all_blocks_free(llm)


def test_step_reports_prefill_then_decode(qwen3_tied):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=16)
    prompts = random_prompts(2, [10, 6], seed=2)
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    signs = []
    while not llm.is_finished():
        _, n = llm.step()
        signs.append(n)
    assert signs == [16, -2, -2]  # one prefill of both prompts, then two decode steps of batch 2


def test_max_tokens_and_eos(qwen3_tied):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=16)
    prompt = random_prompts(1, [8], seed=4)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )
    tokens = out[0]["token_ids"]
    assert len(tokens) == 30
    # Make the 5th generated token the EOS: generation must stop right there (EOS included).
    llm.scheduler.eos_ids = frozenset({tokens[4]})
    if tokens[4] in tokens[:4]:
        pytest.skip("the chosen EOS occurs earlier in this random completion")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    assert out[0]["token_ids"] == tokens[:5]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )
    assert out[0]["token_ids"] == tokens
    assert_all_blocks_free(llm)


def test_string_prompts_and_per_prompt_params(qwen3_tied):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=16)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 5)]
    out = llm.generate(["Hello, world!", "Grüße aus München"], params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in out] == [2, 5]
    assert all(isinstance(o["text"], str) for o in out)


def test_sampling_with_temperature_runs_and_stays_in_vocab(qwen3_tied):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=16)
    out = llm.generate(
        random_prompts(3, [5]), SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert all(len(o["token_ids"]) == 8 and all(0 <= t < 512 for t in o["token_ids"]) for o in out)


def test_context_manager_and_exit_is_idempotent(qwen3_tied):
    with LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=4) as llm:
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm.exit()
    with pytest.raises(RuntimeError, match="exited"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def test_garbage_in_unused_cache_slots_is_ignored(qwen3_tied, reference):
    """Slots no sequence has written may hold anything, NaN included: outputs must not change."""
    prompts = random_prompts(3, [5, 20, 33], seed=12)
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=32)
    llm.model_runner.kv_cache.fill_(float("nan"))
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == reference(prompt, GREEDY.max_tokens)
