"""The engine's public surface for front ends (AsyncLLM, the Ray replicas and driver): the request checks
ahead of queueing, ahead-of-time constraint compiling, and the batch entry points generate is built on."""

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.output_collector import GenerateCollector
from nanovllm.inputs import ParsedPrompt, parse_prompts, prompt_token_ids
from nanovllm.sampling_params import StructuredOutputsParams
from tests.conftest import random_prompts

CONFIG = dict(kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=256, enforce_eager=True, seed=7)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    engine = LLM(qwen3_tied, **CONFIG)
    yield engine
    engine.exit()


def test_validate_request(llm):
    params = SamplingParams(max_tokens=8)
    checked = llm.validate_request(params, 10)
    assert checked is not params and checked.max_tokens == 8
    assert checked.seed is not None and params.seed is None  # the engine seed draws one for the copy
    # 17 prompt tokens: 2 shared blocks, and a partly filled last block for each of 39 more completions.
    with pytest.raises(
        ValueError, match="n=40 completions can need 41 KV blocks of 16 tokens, but the cache has only 32"
    ):
        llm.validate_request(SamplingParams(max_tokens=4, n=40), 17)
    with pytest.raises(ValueError, match="logprobs=100000 is more than the vocabulary"):
        llm.validate_request(SamplingParams(logprobs=100000), 4)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got dict"):
        llm.validate_request({"max_tokens": 8}, 4)
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError):
        llm.validate_request(bad, 4)
    assert llm.get_num_unfinished_requests() == 0  # checks queue nothing


def test_compile_constraint(llm):
    assert llm.compile_constraint(None) is None
    assert llm.compile_constraint(SamplingParams()) is None
    first = llm.compile_constraint(SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    assert first is not None
    # Cached by constraint: an equal constraint in other parameters finds the same grammar.
    again = llm.compile_constraint(
        SamplingParams(temperature=0.5, structured_outputs=StructuredOutputsParams(json=dict(SCHEMA)))
    )
    assert again is first
    with pytest.raises(ValueError):
        llm.compile_constraint(SamplingParams(structured_outputs=StructuredOutputsParams(json="{not json")))
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got str"):
        llm.compile_constraint("json")
    # The engine stays usable, and the precompiled constraint serves its request.
    constraint = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=constraint)
    out = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_add_requests_run_until_and_abort(llm):
    prompts = random_prompts(3, [5, 9, 7])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    collector = GenerateCollector(len(prompts))
    steps = []
    requests = llm.add_requests(parse_prompts(prompts), params, collector)
    assert [r.index for r in requests] == [0, 1, 2]
    llm.run_until(collector.done, lambda num_tokens, dt: steps.append(num_tokens))
    assert [o.outputs[0].token_ids for o in collector.results] == expected
    assert steps and steps[0] > 0  # the first step this thread ran was a prefill
    assert llm.get_num_unfinished_requests() == 0

    # A bad request among good ones queues nothing.
    with pytest.raises(ValueError, match="token id 100000 is outside the vocabulary"):
        llm.add_requests([ParsedPrompt(None, [1, 2]), ParsedPrompt(None, [100000])], params, collector)
    assert llm.get_num_unfinished_requests() == 0

    # Aborting hands the unfinished requests to their owner, finished with "abort".
    collector = GenerateCollector(2)
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    requests = llm.add_requests(parse_prompts(prompts[:2]), long, collector)
    stepped = []
    llm.run_until(lambda: bool(stepped), lambda num_tokens, dt: stepped.append(num_tokens))
    llm.abort_owned_requests(requests)
    assert collector.done() and llm.get_num_unfinished_requests() == 0
    assert [o.outputs[0].finish_reason for o in collector.results] == ["abort", "abort"]


def test_prompt_token_ids(llm):
    tokenizer, vocab = llm.get_tokenizer(), llm.vocab_size
    assert prompt_token_ids(ParsedPrompt(None, [3, 4]), tokenizer, vocab, 8) == [3, 4]
    text = "hello world"
    assert prompt_token_ids(ParsedPrompt(text, None), tokenizer, vocab, 64) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="the prompt is empty"):
        prompt_token_ids(ParsedPrompt(None, []), tokenizer, vocab, 8)
    with pytest.raises(ValueError, match=rf"token id -1 is outside the vocabulary \[0, {vocab}\)"):
        prompt_token_ids(ParsedPrompt(None, [1, -1]), tokenizer, vocab, 8)
    with pytest.raises(ValueError, match="the prompt has 9 tokens, more than max_model_len=8"):
        prompt_token_ids(ParsedPrompt(None, [1] * 9), tokenizer, vocab, 8)
