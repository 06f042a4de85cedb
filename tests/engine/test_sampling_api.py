"""Sampling and generation API beyond the original: truncation, seeds, stops, logprobs, stream, chat."""

import math

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.layers.sampler import Sampler, SamplingTensors, truncate_logits
from tests.conftest import load_hf_model, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    engine = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=64)
    yield engine
    engine.exit()


def kept(logits: list[float], top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    row = torch.tensor([logits])
    out = truncate_logits(
        row, torch.tensor([top_k if top_k > 0 else len(logits)]), torch.tensor([top_p]), torch.tensor([min_p])
    )
    return set(torch.nonzero(out[0] > float("-inf")).flatten().tolist())


def clean_stop(tokenizer, tokens: list[int]) -> str | None:
    """The text of two or three consecutive completion tokens, free of partial characters."""
    for i in range(1, len(tokens) - 3):
        head = tokenizer.decode(tokens[:i])
        for j in (i + 2, i + 3):
            text = tokenizer.decode(tokens[:j])
            if text.startswith(head) and "\ufffd" not in text[len(head) :] and len(text) - len(head) >= 2:
                return text[len(head) :]
    return None


def test_truncation_keeps_exactly_the_expected_tokens():
    logits = [math.log(p) for p in (0.1, 0.5, 0.15, 0.25)]  # token 1 > 3 > 2 > 0
    assert kept(logits, top_k=1) == {1}
    assert kept(logits, top_k=3) == {1, 3, 2}
    assert kept(logits, top_p=0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(logits, top_p=0.7) == {1, 3}
    assert kept(logits, top_p=0.8) == {1, 3, 2}
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3}
    assert kept(logits, min_p=0.29) == {1, 3, 2}  # 0.15 >= 0.29 * 0.5 (0.3 would sit on the boundary)
    assert kept(logits, min_p=0.31) == {1, 3}
    assert kept(logits, top_k=3, top_p=0.7) == {1, 3}


def test_truncated_draws_follow_the_renormalized_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    n = 30000
    logits = probs.log().expand(n, -1).clone()
    params = SamplingTensors(
        torch.ones(n), top_k=torch.full((n,), 4), top_p=torch.full((n,), 0.7), min_p=torch.zeros(n)
    )
    freq = torch.bincount(Sampler()(logits, params), minlength=4).double() / n
    expected = torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75], dtype=torch.double)
    assert torch.allclose(freq, expected, atol=0.015), freq


def test_top_k_1_equals_greedy(llm):
    prompts = random_prompts(4, [3, 12, 30])
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(
        prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=16, ignore_eos=True), use_tqdm=False
    )
    assert [g["token_ids"] for g in greedy] == [t["token_ids"] for t in top1]


@pytest.mark.parametrize("overlap", [True, False])
def test_seed_gives_the_same_tokens_alone_and_in_a_batch(qwen3_tied, overlap):
    engine = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=64, overlap_scheduling=overlap)
    prompt = random_prompts(1, [9], seed=21)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = engine.generate([prompt], seeded, use_tqdm=False)[0]["token_ids"]
    others = random_prompts(5, [4, 17, 40], seed=22)
    hot = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    batch = engine.generate(
        others[:2] + [prompt] + others[2:], [hot, hot, seeded, hot, hot, hot], use_tqdm=False
    )
    assert batch[2]["token_ids"] == alone
    other_seed = engine.generate(
        [prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True), use_tqdm=False
    )[0]["token_ids"]
    assert other_seed != alone
    engine.exit()


def test_stop_string_spanning_several_tokens(llm):
    prompt = random_prompts(1, [6], seed=31)[0]
    ref = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0]
    tokens = ref["token_ids"]

    stop = clean_stop(llm.tokenizer, tokens)
    assert stop is not None, "no clean multi-token text in this random completion"
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0]
    first = ref["text"].find(stop)
    assert out["text"] == ref["text"][:first]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == tokens[: len(out["token_ids"])]
    assert stop in llm.tokenizer.decode(out["token_ids"])
    assert stop not in llm.tokenizer.decode(out["token_ids"][:-1])  # stopped at the first token possible
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_stop_token_ids_and_finish_reasons(llm):
    prompt = random_prompts(1, [7], seed=32)[0]
    ref = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert ref["finish_reason"] == "length"
    stop_id = ref["token_ids"][3]
    first = ref["token_ids"].index(stop_id)
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0]
    assert out["token_ids"] == ref["token_ids"][: first + 1]
    assert out["finish_reason"] == "stop"


def test_logprobs_match_transformers(llm, qwen3_tied):
    prompt = random_prompts(1, [10], seed=33)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3), use_tqdm=False
    )[0]
    assert len(out["logprobs"]) == 5
    hf = load_hf_model(qwen3_tied)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out["token_ids"]])).logits[0].float(), dim=-1)
    for i, (token, lps) in enumerate(zip(out["token_ids"], out["logprobs"])):
        row = ref[len(prompt) - 1 + i]
        top = row.topk(3)
        assert set(top.indices.tolist()) <= set(lps) and token in lps
        for t, lp in lps.items():
            assert abs(lp.logprob - row[t].item()) < 1e-4
            assert lp.rank == int((row > row[t]).sum()) + 1


def test_stream_pieces_join_to_generate_output(llm):
    prompts = random_prompts(3, [4, 11, 25], seed=34) + ["Grüße aus München! 你好，世界。🙂"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = llm.generate(prompts, params, use_tqdm=False)
    texts, tokens, finished = [""] * 4, [[] for _ in range(4)], [None] * 4
    for piece in llm.stream(prompts, params):
        assert finished[piece["index"]] is None, "a piece after the request finished"
        texts[piece["index"]] += piece["text"]
        tokens[piece["index"]] += piece["token_ids"]
        if piece["finished"]:
            finished[piece["index"]] = piece["finish_reason"]
    for i, r in enumerate(ref):
        assert tokens[i] == r["token_ids"]
        assert texts[i] == r["text"]
        assert finished[i] == "length"
    assert llm.is_finished()


def test_stream_with_stop_string_and_multibyte_text(llm):
    prompt = "Grüße aus München! 你好"
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ref = llm.generate([prompt], params, use_tqdm=False)[0]
    stop = clean_stop(llm.tokenizer, ref["token_ids"])
    assert stop is not None, "no clean multi-token text in this random completion"
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=stop)
    gen = llm.generate([prompt], params, use_tqdm=False)[0]
    pieces = list(llm.stream([prompt], params))
    assert "".join(p["text"] for p in pieces) == gen["text"] == ref["text"][: ref["text"].find(stop)]
    assert pieces[-1]["finished"] and pieces[-1]["finish_reason"] == "stop"


def test_stopping_a_stream_early_frees_everything(llm):
    gen = llm.stream(random_prompts(3, [5, 9, 14], seed=35), GREEDY)
    next(gen)
    gen.close()
    assert llm.is_finished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_chat_applies_the_template(llm):
    conversation = [{"role": "user", "content": "Introduce yourself in a few words."}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.chat(conversation, params, use_tqdm=False)
    ids = llm.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert [o.outputs for o in out] == [o.outputs for o in llm.generate([ids], params, use_tqdm=False)]
    assert out[0].prompt_token_ids == ids and out[0].prompt == llm.tokenizer.decode(ids)
    two = llm.chat(
        [conversation, conversation + [{"role": "assistant", "content": "Hi."}]], params, use_tqdm=False
    )
    assert len(two) == 2 and two[0].outputs == out[0].outputs
    with pytest.raises(TypeError):
        llm.chat([{"content": "no role"}], params)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(top_k=1.5),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(seed="x"),
        dict(stop=[""]),
        dict(stop=[3]),
        dict(stop_token_ids=[-1]),
        dict(logprobs=-1),
    ],
)
def test_invalid_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("overlap", [True, False])
def test_prompt_logprobs_whole_under_chunking_preemption_and_forks(qwen3_tied, llm, overlap):
    # Chunks of 16 tokens (their log-probabilities read back after the next chunk is launched), a cache
    # small enough to preempt, and n=2 (a fork and a preempted prompt are computed again): every prompt
    # still gets exactly one log-probability per token after the first, equal to the roomy engine's.
    prompts = random_prompts(3, [40, 50, 60], seed=77)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1, n=2)
    roomy = llm.generate(prompts, params, use_tqdm=False)
    tight = LLM(
        qwen3_tied,
        kvcache_block_size=16,
        num_kvcache_blocks=12,
        max_num_batched_tokens=16,
        overlap_scheduling=overlap,
    )
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks
    tight.exit()
    for prompt, a, b in zip(prompts, roomy, squeezed):
        assert len(b.prompt_logprobs) == len(prompt) and b.prompt_logprobs[0] is None
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for x, y, token in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:]):
            assert token in y and abs(x[token].logprob - y[token].logprob) < 1e-4


def test_a_failed_launch_of_a_forking_step_leaves_n_completions_intact(llm):
    # The prefill that forks n=3 completions raises once: the forks are undone and made again later.
    prompt = random_prompts(1, [21], seed=81)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3)
    expected = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    launch, calls = llm.model_runner.launch, []

    def failing_once(batch, **kwargs):
        calls.append(bool(batch.forks))
        if batch.forks and calls.count(True) == 1:
            raise KeyboardInterrupt
        return launch(batch, **kwargs)

    llm.model_runner.launch = failing_once
    try:
        rid = llm.add_request(prompt, params)
        with pytest.raises(KeyboardInterrupt):
            llm.step()
        finished = {}
        while not llm.is_finished():
            finished.update(llm.step()[0])
    finally:
        del llm.model_runner.launch
    request_outputs = finished[rid]
    assert request_outputs == expected[0] and calls.count(True) == 2
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.block_manager.check_integrity()
