"""Exceptions around steps in flight (overlap scheduling): the engine resumes with correct tokens."""

import pytest

import nanovllm.engine.model_runner as model_runner
from nanovllm import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def run_with_retries(llm: LLM, prompts) -> dict[int, list[int]]:
    """add_request + step() until done, retrying every step that raised KeyboardInterrupt."""
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    outputs, interrupts = {}, 0
    while not llm.is_finished():
        try:
            finished, _ = llm.step()
        except KeyboardInterrupt:
            interrupts += 1
            assert interrupts < 20
            continue
        outputs.update(dict(finished))
    assert interrupts > 0, "the fault was never injected"
    return {i: outputs[i] for i in ids}


@pytest.mark.parametrize("at", [1, 2, 4])
def test_interrupted_read_back_loses_nothing(qwen3_tied, hf_tied, monkeypatch, at):
    original = model_runner.StepResult.tolist
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(model_runner.StepResult, "tolist", flaky)
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=32, overlap_scheduling=True)
    prompts = random_prompts(3, [5, 12, 20], seed=41)
    outputs = run_with_retries(llm, prompts)
    for prompt, tokens in zip(prompts, outputs.values()):
        assert tokens == hf_greedy(hf_tied, prompt, GREEDY.max_tokens)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("at", [2, 3])
def test_failure_late_in_launch_does_not_corrupt_later_steps(qwen3_tied, hf_tied, monkeypatch, at):
    original = model_runner.StepResult.__init__
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(model_runner.StepResult, "__init__", flaky)
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=32, overlap_scheduling=True)
    prompts = random_prompts(2, [7, 16], seed=42)
    outputs = run_with_retries(llm, prompts)
    for prompt, tokens in zip(prompts, outputs.values()):
        assert tokens == hf_greedy(hf_tied, prompt, GREEDY.max_tokens)
    llm.block_manager.check_integrity()


def test_logprobs_beyond_the_vocabulary_are_refused(qwen3_tied):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=8)
    with pytest.raises(ValueError, match="logprobs=1000 is more than the vocabulary"):
        llm.add_request([1, 2, 3], SamplingParams(logprobs=1000))
    assert llm.is_finished()


def test_failed_decode_launch_does_not_leave_a_block_cached(qwen3_tied, monkeypatch):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=8, overlap_scheduling=False)
    llm.add_request(list(range(1, 16)), GREEDY)  # 15 prompt tokens: the first sampled token fills block 0
    llm.step()  # prefill
    bm = llm.block_manager
    assert not bm.hash_to_block_id
    original = llm.model_runner.launch
    monkeypatch.setattr(llm.model_runner, "launch", lambda batch: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        llm.step()  # may_append hashed block 0, whose last slot this failed step never wrote
    assert not bm.hash_to_block_id
    monkeypatch.setattr(llm.model_runner, "launch", original)
    llm.step()  # the decode runs for real: now block 0 is complete and cached
    assert len(bm.hash_to_block_id) == 1
    bm.check_integrity()
