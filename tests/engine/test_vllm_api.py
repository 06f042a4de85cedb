"""vLLM's offline API end to end on the CPU: output objects, prompt forms, generation_config.json defaults
and EOS ids, n > 1, min_tokens, logit_bias / allowed_token_ids, penalties, detokenization, stop strings,
logprobs and prompt logprobs, engine seeds, prefix caching off, LLMEngine, chat and refused values.

References are transformers' own model (`generate`, or its logits step by step on prompt + completion)
or a computation in the test; the engine is used as a user would."""

import json
import shutil

import pytest
import torch
import transformers

import nanovllm
from nanovllm import (
    LLM,
    CompletionOutput,
    EngineArgs,
    LLMEngine,
    Logprob,
    RequestOutput,
    SamplingParams,
    TextPrompt,
    TokensPrompt,
)
from tests.conftest import hf_greedy, random_prompts

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=1024, enforce_eager=True)
TEXT_VOCAB = 400  # the tiny tokenizer's size (the model's vocabulary is 512: ids above decode to "")


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def gen(llm, prompts, params=None) -> list[RequestOutput]:
    return llm.generate(prompts, params, use_tqdm=False)


def assert_all_free(llm) -> None:
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()
    assert llm.is_finished()


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    engine = LLM(qwen3_tied, **ENGINE)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits at every position of `ids`: [len(ids), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]


def hf_reference(
    model,
    prompt: list[int],
    max_tokens: int,
    *,
    allowed: list[int] | None = None,
    banned_until: tuple[set[int], int] = (set(), 0),
    stop_ids: set[int] = frozenset(),
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> list[int]:
    """Greedy decoding on transformers' logits, one full forward per token, with the adjustment applied
    to each step's logits: only `allowed` tokens; `banned_until = (ids, k)`: ids impossible while fewer
    than k tokens exist; presence/frequency penalties on the completion's counts. Stops after a token of
    `stop_ids` once the ban is over."""
    banned, min_tokens = banned_until
    out: list[int] = []
    for _ in range(max_tokens):
        row = hf_logits(model, prompt + out)[-1].clone()
        if allowed is not None:
            keep = torch.full_like(row, float("-inf"))
            keep[allowed] = 0.0
            row = row + keep
        if len(out) < min_tokens:
            row[list(banned)] = float("-inf")
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.numel()).float()
        row = row - frequency_penalty * counts - presence_penalty * (counts > 0).float()
        out.append(int(row.argmax()))
        if len(out) >= min_tokens and out[-1] in stop_ids:
            break
    return out


def first_new_token(tokens: list[int], start: int, exclude: set[int] = frozenset()) -> int:
    """The first position >= start whose token does not occur before it (and is not in `exclude`)."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k] and tokens[k] not in exclude:
            return k
    raise AssertionError(f"no token in {tokens} from position {start} is new")


def clean_stop(tok, tokens: list[int]) -> tuple[str, str] | None:
    """(text before, stop string): two or three consecutive tokens whose text is whole characters."""
    for i in range(1, len(tokens) - 3):
        head = tok.decode(tokens[:i], skip_special_tokens=True)
        if "\ufffd" in head:
            continue
        for j in (i + 2, i + 3):
            text = tok.decode(tokens[:j], skip_special_tokens=True)
            piece = text[len(head) :]
            if (
                text.startswith(head)
                and "\ufffd" not in piece
                and len(piece.strip()) >= 2
                and piece not in head
            ):
                return head, piece
    return None


# ---- 1. output objects ---------------------------------------------------------------------------


def test_generate_returns_request_outputs(llm, tok, hf_tied):
    assert nanovllm.RequestOutput is RequestOutput and nanovllm.CompletionOutput is CompletionOutput
    text = "Hello, my name is"
    ids = random_prompts(1, [7], seed=101)[0]
    params = greedy(6)
    by_text, by_ids = gen(llm, [text, ids], params)
    for out, prompt_ids in ((by_text, tok.encode(text)), (by_ids, ids)):
        assert isinstance(out, RequestOutput)
        assert isinstance(out.request_id, str) and out.request_id
        assert out.prompt_token_ids == prompt_ids
        assert out.finished is True
        assert len(out.outputs) == 1
        c = out.outputs[0]
        assert isinstance(c, CompletionOutput)
        assert c.index == 0
        assert c.token_ids == hf_greedy(hf_tied, prompt_ids, 6)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == "length" and c.stop_reason is None and c.finished() is True
        assert c.cumulative_logprob is None and c.logprobs is None  # not asked for
        # The original's dict access reads the first completion.
        assert out["text"] == c.text and out["token_ids"] == c.token_ids
        assert out["finish_reason"] == "length" and out["logprobs"] is None
        with pytest.raises(KeyError):
            out["no_such_key"]
    assert by_text.prompt == text
    assert by_ids.prompt is None
    assert by_text.request_id != by_ids.request_id
    with_lp = gen(llm, text, greedy(3, logprobs=1))[0]
    assert with_lp["logprobs"] is with_lp.outputs[0].logprobs and len(with_lp["logprobs"]) == 3


# ---- 2. prompt forms -----------------------------------------------------------------------------


def test_prompt_forms_give_the_same_tokens_in_order(llm, tok):
    texts = ["Hello, my name is", "The quick brown fox", "Grüße aus München!"]
    ids = random_prompts(2, [5, 9], seed=102)
    params = greedy(5)
    plain_text = [o["token_ids"] for o in gen(llm, texts, params)]
    plain_ids = [o["token_ids"] for o in gen(llm, ids, params)]
    assert len(set(map(tuple, plain_text + plain_ids))) == 5  # distinct prompts, distinct completions

    single = gen(llm, texts[1], params)
    assert len(single) == 1 and single[0]["token_ids"] == plain_text[1] and single[0].prompt == texts[1]
    flat = gen(llm, ids[0], params)  # a flat list of ints is one prompt
    assert len(flat) == 1 and flat[0]["token_ids"] == plain_ids[0] and flat[0].prompt is None
    as_dicts = gen(llm, [TextPrompt(prompt=t) for t in texts], params)
    assert [o["token_ids"] for o in as_dicts] == plain_text and [o.prompt for o in as_dicts] == texts
    as_token_dicts = gen(llm, [TokensPrompt(prompt_token_ids=p) for p in ids], params)
    assert [o["token_ids"] for o in as_token_dicts] == plain_ids
    one_dict = gen(llm, {"prompt_token_ids": ids[1]}, params)
    assert len(one_dict) == 1 and one_dict[0]["token_ids"] == plain_ids[1]

    mixed = [ids[1], texts[2], {"prompt_token_ids": ids[0]}, {"prompt": texts[0]}, texts[1]]
    outs = gen(llm, mixed, params)
    assert [o["token_ids"] for o in outs] == [
        plain_ids[1],
        plain_text[2],
        plain_ids[0],
        plain_text[0],
        plain_text[1],
    ]
    assert [o.prompt_token_ids for o in outs] == [
        ids[1],
        tok.encode(texts[2]),
        ids[0],
        tok.encode(texts[0]),
        tok.encode(texts[1]),
    ]
    assert [o.prompt for o in outs] == [None, texts[2], None, texts[0], texts[1]]
    assert_all_free(llm)


# ---- 3, 4, 6. generation_config.json: defaults and multi-id EOS ----------------------------------


def copy_with_generation_config(src: str, dst, config: dict) -> str:
    shutil.copytree(src, dst)
    with open(dst / "generation_config.json", "w") as f:
        json.dump(config, f)
    return str(dst)


def test_generation_config_gives_the_default_sampling_params(qwen3_tied, tmp_path, llm, hf_tied):
    path = copy_with_generation_config(
        qwen3_tied,
        tmp_path / "defaults",
        {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 7, "max_new_tokens": 5},
    )
    engine = LLM(path, **ENGINE)
    try:
        defaults = engine.get_default_sampling_params()
        assert isinstance(defaults, SamplingParams)
        assert defaults.temperature == 0.0  # do_sample false: greedy
        assert (defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.9, 7, 5)
        prompts = random_prompts(3, [4, 11], seed=103)
        outs = gen(engine, prompts)  # no sampling_params: the file's
        expected = gen(llm, prompts, SamplingParams(temperature=0.0, max_tokens=5))
        assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in expected]
        for p, o in zip(prompts, outs):  # EOS could end one earlier; with these prompts it does not
            assert len(o["token_ids"]) == 5 and o["finish_reason"] == "length"
            assert o["token_ids"] == hf_greedy(hf_tied, p, 5)
        assert len(engine.generate(prompts[0], use_tqdm=False)[0]["token_ids"]) == 5
    finally:
        engine.exit()
    # Sampling defaults too: temperature from the file.
    path2 = copy_with_generation_config(qwen3_tied, tmp_path / "sampled", {"temperature": 0.6, "top_k": 0})
    engine = LLM(path2, **ENGINE)
    try:
        defaults = engine.get_default_sampling_params()
        assert defaults.temperature == 0.6 and defaults.top_k in (-1, 0) and defaults.max_tokens == 64
    finally:
        engine.exit()


@pytest.fixture(scope="module")
def eos_case(qwen3_tied, tmp_path_factory, llm, tok):
    """A checkpoint copy whose generation_config.json lists [tokenizer EOS, X], X being the token greedy
    emits at position k of `prompt` for the first time. Yields (engine, prompt, greedy tokens, k, X)."""
    prompt = random_prompts(1, [6], seed=104)[0]
    tokens = gen(llm, prompt, greedy(14))[0]["token_ids"]
    k = first_new_token(tokens, 2, {tok.eos_token_id})
    x = tokens[k]
    path = copy_with_generation_config(
        qwen3_tied, tmp_path_factory.mktemp("eos") / "ckpt", {"eos_token_id": [tok.eos_token_id, x]}
    )
    engine = LLM(path, **ENGINE)
    yield engine, prompt, tokens, k, x
    engine.exit()


def test_generation_config_eos_list_ends_generation(eos_case):
    engine, prompt, tokens, k, x = eos_case
    out = gen(engine, prompt, SamplingParams(temperature=0.0, max_tokens=14))[0]
    assert out["token_ids"] == tokens[: k + 1]
    assert out["finish_reason"] == "stop" and out["stop_reason"] is None  # EOS: no stop reason
    assert out["text"] == engine.get_tokenizer().decode(
        tokens[:k], skip_special_tokens=True
    )  # EOS not in text
    ignored = gen(engine, prompt, greedy(14))[0]
    assert ignored["token_ids"] == tokens and ignored["finish_reason"] == "length"
    assert_all_free(engine)


def test_min_tokens_holds_back_a_generation_config_eos(eos_case, hf_tied, tok):
    engine, prompt, tokens, k, x = eos_case
    m = k + 3
    out = gen(engine, prompt, SamplingParams(temperature=0.0, max_tokens=14, min_tokens=m))[0]
    ids = out["token_ids"]
    eos = {tok.eos_token_id, x}
    assert not eos & set(ids[:m])  # no EOS before min_tokens tokens exist
    assert len(ids) >= m
    assert ids == hf_reference(hf_tied, prompt, 14, banned_until=(eos, m), stop_ids=eos)
    if len(ids) < 14:
        assert ids[-1] in eos and out["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def eos_at_one(qwen3_tied, tmp_path_factory, llm, tok):
    """A prompt whose greedy completion's token 1 (t) is new, and a checkpoint copy listing
    [tokenizer EOS, t] as EOS ids. Yields (engine, prompt, greedy tokens, t)."""
    for seed in range(130, 160):
        prompt = random_prompts(1, [7], seed=seed)[0]
        tokens = gen(llm, prompt, greedy(12))[0]["token_ids"]
        if tokens[1] != tokens[0] and tok.eos_token_id not in tokens[:2]:
            break
    else:
        raise AssertionError("no prompt whose greedy token 1 differs from token 0")
    t = tokens[1]
    path = copy_with_generation_config(
        qwen3_tied, tmp_path_factory.mktemp("eos1") / "ckpt", {"eos_token_id": [tok.eos_token_id, t]}
    )
    engine = LLM(path, **ENGINE)
    yield engine, prompt, tokens, t
    engine.exit()


def test_min_tokens_5_suppresses_an_eos_at_position_1(eos_at_one, llm, hf_tied, tok):
    engine, prompt, tokens, t = eos_at_one
    plain = gen(engine, prompt, SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert plain["token_ids"] == tokens[:2] and plain["finish_reason"] == "stop"
    stops = {tok.eos_token_id, t}
    reference = hf_reference(hf_tied, prompt, 12, banned_until=(stops, 5), stop_ids=stops)
    held = gen(engine, prompt, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5))[0]
    ids = held["token_ids"]
    assert len(ids) >= 5 and t not in ids[:5] and tok.eos_token_id not in ids[:5]
    assert ids == reference
    # The same with t as a stop token on the plain checkpoint.
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[t])
    assert gen(llm, prompt, params)[0]["token_ids"] == tokens[:2]
    params.min_tokens = 5
    by_stop_id = gen(llm, prompt, params)[0]
    ids = by_stop_id["token_ids"]
    assert len(ids) >= 5 and t not in ids[:5]
    assert ids == reference
    if len(ids) < 12:
        assert by_stop_id["finish_reason"] == "stop" and ids[-1] in stops
    assert_all_free(engine)
    assert_all_free(llm)


# ---- 5. n > 1 ------------------------------------------------------------------------------------


def test_n_greedy_completions_equal_transformers(llm, hf_tied):
    prompt = random_prompts(1, [13], seed=105)[0]
    out = gen(llm, prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, n=4))[0]
    reference = hf_greedy(hf_tied, prompt, 8)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == reference for c in out.outputs)
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert_all_free(llm)


def test_n_prefills_the_prompt_once_and_shares_its_blocks(llm, hf_tied):
    prompt = random_prompts(1, [37], seed=106)[0]  # two full blocks and a partial one
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=4)
    rid = llm.add_request(prompt, params)
    assert isinstance(rid, int)
    prefilled, finished, steps, shared = 0, [], 0, False
    while not llm.is_finished():
        done, num_tokens = llm.step()
        finished += done
        if num_tokens > 0:
            prefilled += num_tokens
            if steps == 0:
                seqs = list(llm.scheduler.running)
                assert len(seqs) == 4
                tables = [s.block_table for s in seqs]
                for b in range(len(prompt) // 16):  # the prompt's full blocks: one copy, four owners
                    assert len({t[b] for t in tables}) == 1
                    assert llm.block_manager.blocks[tables[0][b]].ref_count == 4
                assert len({t[-1] for t in tables}) == 4  # each its own partly filled last block
                shared = True
        steps += 1
    assert shared, "the first step was not the prefill"
    assert prefilled == len(prompt)
    assert [r for r, _ in finished] == [rid]
    assert finished[0][1] == hf_greedy(hf_tied, prompt, 6)
    assert_all_free(llm)


def test_n_seeded_sampling_differs_and_repeats(llm):
    prompt = random_prompts(1, [9], seed=107)[0]
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True, n=3)
    first = gen(llm, prompt, params)[0]
    again = gen(llm, prompt, params)[0]
    runs = [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len(set(map(tuple, runs))) == 3
    assert [c.token_ids for c in again.outputs] == runs
    assert_all_free(llm)


def test_n_seeded_completion_i_uses_seed_plus_i(llm):
    prompt = random_prompts(1, [9], seed=126)[0]
    sampled = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    out = gen(llm, prompt, SamplingParams(seed=40, n=3, **sampled))[0]
    singles = [gen(llm, prompt, SamplingParams(seed=40 + i, **sampled))[0]["token_ids"] for i in range(3)]
    assert [c.token_ids for c in out.outputs] == singles
    # A seeded request draws the same tokens whatever else shares its batch.
    others = random_prompts(3, [5, 21], seed=127)
    batch = gen(
        llm,
        [others[0], prompt, others[1], others[2]],
        [
            SamplingParams(temperature=0.7, max_tokens=5),
            SamplingParams(seed=41, **sampled),
            SamplingParams(temperature=0.5, top_k=3, max_tokens=12, n=2),
            greedy(9, repetition_penalty=1.2),
        ],
    )
    assert batch[1]["token_ids"] == singles[1]
    assert_all_free(llm)


def test_n_forks_keep_their_own_sampling_state(llm, hf_tied):
    """Each fork's penalties, min_tokens and truncation follow its own tokens: completion i equals a
    single request with seed + i. Greedy forks of block-aligned prompts (no partial block to copy)
    equal transformers."""
    prompt = random_prompts(1, [13], seed=135)[0]
    for extra in (
        dict(frequency_penalty=1.5, ignore_eos=True),
        dict(repetition_penalty=1.4, top_k=5, top_p=0.8, ignore_eos=True),
        dict(presence_penalty=1.0, min_tokens=8, stop_token_ids=list(range(200))),
    ):
        base = dict(temperature=1.0, max_tokens=12, **extra)
        out = gen(llm, prompt, SamplingParams(seed=100, n=3, **base))[0]
        singles = [gen(llm, prompt, SamplingParams(seed=100 + i, **base))[0]["token_ids"] for i in range(3)]
        assert [c.token_ids for c in out.outputs] == singles, extra
        assert len(set(map(tuple, singles))) > 1
    for length in (16, 32):
        aligned = random_prompts(1, [length], seed=136 + length)[0]
        out = gen(llm, aligned, greedy(18, n=3))[0]
        assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_tied, aligned, 18)] * 3
    assert_all_free(llm)


# ---- 6. min_tokens with a stop token -------------------------------------------------------------


def test_min_tokens_holds_back_stop_token_and_eos(llm, hf_tied, tok):
    prompt = random_prompts(1, [8], seed=108)[0]
    tokens = gen(llm, prompt, greedy(16))[0]["token_ids"]
    k = first_new_token(tokens, 1, {tok.eos_token_id})
    t = tokens[k]
    plain = gen(llm, prompt, SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[t]))[0]
    assert plain["token_ids"] == tokens[: k + 1]
    m = k + 4
    params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[t], min_tokens=m)
    ids = gen(llm, prompt, params)[0]["token_ids"]
    stops = {t, tok.eos_token_id}
    assert t not in ids[:m] and tok.eos_token_id not in ids[:m]
    assert len(ids) >= m
    assert ids == hf_reference(hf_tied, prompt, 16, banned_until=(stops, m), stop_ids=stops)


# ---- 7. logit_bias and allowed_token_ids ---------------------------------------------------------


def test_logit_bias_forces_a_token(llm):
    prompts = random_prompts(2, [5, 12], seed=109)
    target = 123
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, logit_bias={target: 100})
    for out in gen(llm, prompts, params):
        assert out["token_ids"] == [target] * 8
    negative = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = gen(llm, prompts[0], negative)[0]["token_ids"]
    banned = tokens[0]
    negative.logit_bias = {banned: -100}
    assert banned not in gen(llm, prompts[0], negative)[0]["token_ids"]


def test_allowed_token_ids_restrict_greedy(llm, hf_tied):
    varied = False
    for seed in range(110, 114):
        prompt = random_prompts(1, [10], seed=seed)[0]
        plain = gen(llm, prompt, greedy(10))[0]["token_ids"]
        # The unrestricted completion's 2nd-4th distinct tokens: each is likely at some step.
        allowed = list(dict.fromkeys(plain))[1:4]
        out = gen(llm, prompt, greedy(10, allowed_token_ids=allowed))[0]
        assert set(out["token_ids"]) <= set(allowed)
        assert out["token_ids"] == hf_reference(hf_tied, prompt, 10, allowed=allowed)
        varied |= len(set(out["token_ids"])) > 1
    assert varied, "every restricted completion repeats one token: the test would not see a wrong choice"


# ---- 8. penalties --------------------------------------------------------------------------------


def test_repetition_penalty_equals_transformers(llm, hf_tied):
    prompts = random_prompts(3, [6, 15], seed=111)
    changed = False
    for prompt in prompts:
        out = gen(llm, prompt, greedy(12, repetition_penalty=1.3))[0]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf_tied.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                repetition_penalty=1.3,
                eos_token_id=None,
            )[0, len(prompt) :].tolist()
        assert out["token_ids"] == ref
        changed |= ref != hf_greedy(hf_tied, prompt, 12)
    assert changed, "the penalty changed none of these completions: the test would not see it"


def max_repeats(tokens: list[int]) -> int:
    return max(tokens.count(t) for t in tokens)


def test_frequency_and_presence_penalties_stop_repeats(llm, hf_tied):
    # Prompts whose greedy completion repeats a token; the penalties must change it in the direction
    # of their sign (transformers' logits with the penalty subtracted, step by step).
    changed = {"frequency": False, "presence": False}
    checked, more_distinct = 0, False
    for seed in range(200, 260):
        prompt = random_prompts(1, [6], seed=seed)[0]
        plain = gen(llm, prompt, greedy(16))[0]["token_ids"]
        if max_repeats(plain) < 2:
            continue
        checked += 1
        freq = gen(llm, prompt, greedy(16, frequency_penalty=2.0))[0]["token_ids"]
        pres = gen(llm, prompt, greedy(16, presence_penalty=2.0))[0]["token_ids"]
        more = gen(llm, prompt, greedy(16, presence_penalty=-2.0))[0]["token_ids"]
        assert freq == hf_reference(hf_tied, prompt, 16, frequency_penalty=2.0)
        assert pres == hf_reference(hf_tied, prompt, 16, presence_penalty=2.0)
        assert more == hf_reference(hf_tied, prompt, 16, presence_penalty=-2.0)
        # Positive penalties: no more repetition than without; a negative one: no less.
        assert len(set(freq)) >= len(set(plain)) and len(set(pres)) >= len(set(plain))
        assert len(set(more)) <= len(set(plain))
        changed["frequency"] |= freq != plain
        more_distinct |= len(set(freq)) > len(set(plain))
        changed["presence"] |= pres != plain
        if all(changed.values()) and more_distinct and checked >= 2:
            break
    assert all(changed.values()), f"the penalties changed too little to be seen: {changed}"
    assert more_distinct, "frequency_penalty=2.0 never gave more distinct tokens than plain greedy"


def test_sampling_fields_in_one_batch_equal_single_runs(llm):
    """Per-row penalties, biases, masks and min_tokens keep to their own rows in a mixed batch (each
    single run is checked against transformers above)."""
    prompts = random_prompts(7, [6, 19, 11, 25, 8, 14, 9], seed=128)
    params = [
        greedy(10, repetition_penalty=1.3),
        greedy(10),
        greedy(10, frequency_penalty=2.0),
        greedy(10, allowed_token_ids=[5, 17, 300, 301]),
        greedy(10, logit_bias={9: 3.0, 40: 2.5}),
        SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, stop_token_ids=list(range(100, 300))),
        greedy(10, presence_penalty=-2.0, n=2),
    ]
    single = [[c.token_ids for c in gen(llm, p, sp)[0].outputs] for p, sp in zip(prompts, params)]
    assert len(single[5][0]) >= 6
    batch = [[c.token_ids for c in o.outputs] for o in gen(llm, prompts, params)]
    assert batch == single
    backwards = [[c.token_ids for c in o.outputs] for o in gen(llm, prompts[::-1], params[::-1])]
    assert backwards[::-1] == single
    assert_all_free(llm)


# ---- 9. skip_special_tokens ----------------------------------------------------------------------


def test_skip_special_tokens_on_forced_special_tokens(llm, tok):
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    prompt = random_prompts(1, [5], vocab=TEXT_VOCAB, seed=125)[0]
    params = greedy(3, logit_bias={im_start: 100})
    out = gen(llm, prompt, params)[0]
    assert out["token_ids"] == [im_start] * 3
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True) == ""
    params.skip_special_tokens = False
    kept = gen(llm, prompt, params)[0]
    assert kept["token_ids"] == [im_start] * 3
    assert kept["text"] == tok.decode(kept["token_ids"]) and "<|im_start|>" in kept["text"]


def test_skip_special_tokens(llm, tok):
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert im_start in tok.all_special_ids or tok.decode([im_start], skip_special_tokens=True) == ""
    prompt = random_prompts(1, [7], vocab=TEXT_VOCAB, seed=112)[0]
    out = None
    for bias in (2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0):  # some special tokens among ordinary ones
        params = greedy(12, logit_bias={im_start: bias})
        candidate = gen(llm, prompt, params)[0]
        ids = candidate["token_ids"]
        if im_start in ids and tok.decode([t for t in ids if t != im_start]).strip():
            out = candidate
            break
    assert out is not None, "no bias gives a completion with both special and ordinary text"
    ids = out["token_ids"]
    assert out["text"] == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in out["text"]
    params.skip_special_tokens = False
    kept = gen(llm, prompt, params)[0]
    assert kept["token_ids"] == ids
    assert kept["text"] == tok.decode(ids) and "<|im_start|>" in kept["text"]


# ---- 10. stop strings, stop tokens, EOS ----------------------------------------------------------


def test_stop_strings(llm, tok):
    prompt, found = None, None
    for seed in range(300, 340):
        prompt = random_prompts(1, [6], vocab=TEXT_VOCAB, seed=seed)[0]
        tokens = gen(llm, prompt, greedy(30))[0]["token_ids"]
        found = clean_stop(tok, tokens)
        if found is not None:
            break
    assert found is not None, "no clean stop string in these completions"
    head, stop = found
    full = tok.decode(tokens, skip_special_tokens=True)
    cut = full.find(stop)
    assert cut >= 0
    out = gen(llm, prompt, greedy(30, stop=[stop]))[0]
    assert out["text"] == full[:cut]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == stop
    assert out["token_ids"] == tokens[: len(out["token_ids"])]
    kept = gen(llm, prompt, greedy(30, stop=stop, include_stop_str_in_output=True))[0]
    assert kept["text"] == full[: cut + len(stop)] and kept["text"].endswith(stop)
    assert kept["finish_reason"] == "stop" and kept["stop_reason"] == stop
    assert_all_free(llm)


def test_stop_string_from_the_middle_of_a_completion(llm, tok):
    """Three characters from the middle of a greedy completion's text (not aligned to its tokens) as
    the stop string: the text is cut right before it, or ends with it when it is kept. Tokens are
    restricted to printable ASCII ones so the text has no partial characters."""
    printable = [i for i in range(TEXT_VOCAB) if (d := tok.decode([i])) and d.isascii() and d.isprintable()]
    for seed in range(340, 380):
        prompt = random_prompts(1, [6], vocab=TEXT_VOCAB, seed=seed)[0]
        params = greedy(24, allowed_token_ids=printable)
        tokens = gen(llm, prompt, params)[0]["token_ids"]
        full = tok.decode(tokens, skip_special_tokens=True)
        mid = len(full) // 2
        stop = full[mid : mid + 3]
        starts = {len(tok.decode(tokens[:i], skip_special_tokens=True)) for i in range(len(tokens))}
        if len(full) >= 12 and stop.strip() == stop and len(stop) == 3 and full.find(stop) not in starts:
            break
    else:
        raise AssertionError("no completion with a stop string inside a token")
    cut = full.find(stop)
    assert 0 < cut <= mid
    params.stop = stop
    out = gen(llm, prompt, params)[0]
    assert out["text"] == full[:cut]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == stop
    ids = out["token_ids"]
    assert ids == tokens[: len(ids)]  # generation ended once the stop string was complete
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    params.stop, params.include_stop_str_in_output = [stop], True
    kept = gen(llm, prompt, params)[0]
    assert kept["text"] == full[: cut + len(stop)]
    assert kept["finish_reason"] == "stop" and kept["stop_reason"] == stop
    assert kept["token_ids"] == ids
    assert_all_free(llm)


def test_min_tokens_stop_string_generated_before_min_tokens_does_not_match_later(llm, tok):
    """A stop string whose only occurrence lies within the first min_tokens tokens never matches: the
    check after min_tokens looks at newly generated text only (vLLM's rule), so the completion runs to
    max_tokens; one occurring again later stops there."""
    printable = [i for i in range(TEXT_VOCAB) if (d := tok.decode([i])) and d.isascii() and d.isprintable()]
    params = greedy(24, allowed_token_ids=printable)
    m = 10
    once = again = None
    for seed in range(340, 400):
        prompt = random_prompts(1, [6], vocab=TEXT_VOCAB, seed=seed)[0]
        tokens = gen(llm, prompt, params)[0]["token_ids"]
        full = tok.decode(tokens)
        early_end = len(tok.decode(tokens[:3]))  # the stop string ends within the first 3 tokens
        late_start = len(tok.decode(tokens[: m + 1]))  # a later occurrence starts after token m + 1
        for i in range(early_end - 2):
            stop = full[i : i + 3]
            if stop.strip() != stop or full.find(stop) != i:
                continue
            later = full.find(stop, i + 1)
            if later == -1 and once is None:
                once = (prompt, tokens, full, stop)
            elif later >= late_start and full.find(stop, i + 1, later) == -1 and again is None:
                again = (prompt, tokens, full, stop, later)
        if once and again:
            break
    assert once is not None, "no completion with a stop string only among its first tokens"
    prompt, tokens, full, stop = once
    assert (
        gen(llm, prompt, greedy(24, allowed_token_ids=printable, stop=stop))[0]["text"]
        == full[: full.find(stop)]
    )
    out = gen(llm, prompt, greedy(24, allowed_token_ids=printable, stop=stop, min_tokens=m))[0]
    assert (out["token_ids"], out["text"], out["finish_reason"]) == (tokens, full, "length")
    if again is not None:
        prompt, tokens, full, stop, later = again
        out = gen(llm, prompt, greedy(24, allowed_token_ids=printable, stop=stop, min_tokens=m))[0]
        assert out["text"] == full[:later] and out["finish_reason"] == "stop" and out["stop_reason"] == stop
        ids = out["token_ids"]
        assert ids == tokens[: len(ids)] and len(tok.decode(ids)) >= later + len(stop) > len(
            tok.decode(ids[:-1])
        )
    assert_all_free(llm)


def test_stop_token_ids_and_eos_reasons(llm, tok):
    prompt = random_prompts(1, [9], seed=113)[0]
    tokens = gen(llm, prompt, greedy(14))[0]["token_ids"]
    k = first_new_token(tokens, 2, {tok.eos_token_id})
    t = tokens[k]
    out = gen(llm, prompt, greedy(14, stop_token_ids=[t]))[0]
    assert out["token_ids"] == tokens[: k + 1]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == t
    assert out["text"] == tok.decode(tokens[:k], skip_special_tokens=True)
    # EOS (made certain): finish_reason "stop", no stop_reason.
    eos = gen(
        llm, prompt, SamplingParams(temperature=0.0, max_tokens=14, logit_bias={tok.eos_token_id: 100})
    )[0]
    assert eos["token_ids"] == [tok.eos_token_id]
    assert eos["finish_reason"] == "stop" and eos["stop_reason"] is None and eos["text"] == ""
    length = gen(llm, prompt, greedy(3))[0]
    assert length["finish_reason"] == "length" and length["stop_reason"] is None


# ---- 11. logprobs and prompt logprobs ------------------------------------------------------------


def check_logprob_entry(entry: dict, row: torch.Tensor, token: int, num_top: int, tok) -> float:
    """`entry` ({id: Logprob}) holds `token` and the `num_top` most likely of `row` (log-softmax), with
    transformers' values, ranks and texts. Returns the token's logprob."""
    lp = torch.log_softmax(row.double(), dim=-1)
    top = torch.argsort(lp, descending=True)[:num_top].tolist()
    assert set(entry) == set(top) | {token}
    assert next(iter(entry)) == token  # the sampled (or prompt) token first
    for t, value in entry.items():
        assert isinstance(value, Logprob)
        assert value.logprob == pytest.approx(lp[t].item(), abs=1e-4)
        assert value.decoded_token == tok.decode([t])
    for rank, t in enumerate(top, start=1):
        if t != token:
            assert entry[t].rank == rank
    assert entry[token].rank == 1 + int((lp > lp[token]).sum())
    return entry[token].logprob


def test_logprobs_match_transformers(llm, hf_tied, tok):
    prompt = random_prompts(1, [11], vocab=TEXT_VOCAB, seed=114)[0]
    for params in (
        greedy(8, logprobs=3),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=3),
    ):
        c = gen(llm, prompt, params)[0].outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 8
        logits = hf_logits(hf_tied, prompt + c.token_ids)
        total = 0.0
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            total += check_logprob_entry(entry, logits[len(prompt) - 1 + i], token, 3, tok)
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
        if params.temperature == 0.0:
            assert c.token_ids == hf_greedy(hf_tied, prompt, 8)
            assert all(entry[t].rank == 1 for t, entry in zip(c.token_ids, c.logprobs))
        else:  # a draw at temperature 1 does not always take the most likely token
            assert any(entry[t].rank > 1 for t, entry in zip(c.token_ids, c.logprobs))


def test_logprobs_are_of_the_raw_distribution(llm, hf_tied, tok):
    """Penalties and biases change the choice, not the reported log-probabilities (vLLM's raw ones)."""
    prompt = random_prompts(1, [10], vocab=TEXT_VOCAB, seed=129)[0]
    params = greedy(6, logprobs=2, repetition_penalty=1.5, logit_bias={7: 5.0})
    c = gen(llm, prompt, params)[0].outputs[0]
    logits = hf_logits(hf_tied, prompt + c.token_ids)
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        check_logprob_entry(entry, logits[len(prompt) - 1 + i], token, 2, tok)
    assert c.token_ids != hf_greedy(hf_tied, prompt, 6)  # the adjustments did change the choice


def test_logprobs_count_is_per_request_in_a_mixed_batch(llm, hf_tied, tok):
    """Each request gets its own N most likely tokens, whatever N its batch neighbours asked for."""
    prompts = random_prompts(4, [17, 5, 33, 12], vocab=TEXT_VOCAB, seed=130)
    asked = [2, None, 0, 4]
    params = [greedy(4, logprobs=k) for k in asked]
    for out, prompt, k in zip(gen(llm, prompts, params), prompts, asked):
        c = out.outputs[0]
        assert c.token_ids == hf_greedy(hf_tied, prompt, 4)
        if k is None:
            assert c.logprobs is None and c.cumulative_logprob is None
            continue
        logits = hf_logits(hf_tied, prompt + c.token_ids)
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            check_logprob_entry(entry, logits[len(prompt) - 1 + i], token, k, tok)


def test_prompt_logprobs_in_a_mixed_batch(llm, hf_tied, tok):
    prompts = random_prompts(4, [17, 5, 33, 12], vocab=TEXT_VOCAB, seed=131)
    asked = [2, None, 1, 3]
    outs = gen(llm, prompts, [greedy(3, prompt_logprobs=k) for k in asked])
    for out, prompt, k in zip(outs, prompts, asked):
        assert out["token_ids"] == hf_greedy(hf_tied, prompt, 3)
        if k is None:
            assert out.prompt_logprobs is None
        else:
            check_prompt_logprobs(out, hf_tied, tok, k)
    # With n: the prompt's list once, for the request.
    out = gen(llm, prompts[2], greedy(3, prompt_logprobs=2, n=3))[0]
    check_prompt_logprobs(out, hf_tied, tok)
    assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_tied, prompts[2], 3)] * 3
    assert_all_free(llm)


def check_prompt_logprobs(out: RequestOutput, model, tok, num_top: int = 2) -> None:
    prompt = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt)
    assert plp[0] is None
    logits = hf_logits(model, prompt)
    for i in range(1, len(prompt)):
        check_logprob_entry(plp[i], logits[i - 1], prompt[i], num_top, tok)


def test_prompt_logprobs_match_transformers(llm, hf_tied, tok):
    prompt = random_prompts(1, [21], vocab=TEXT_VOCAB, seed=115)[0]
    params = greedy(3, prompt_logprobs=2)
    out = gen(llm, prompt, params)[0]
    check_prompt_logprobs(out, hf_tied, tok)
    assert out["token_ids"] == hf_greedy(hf_tied, prompt, 3)
    # The same prompt again (its full block is in the prefix cache): still every position.
    again = gen(llm, prompt, params)[0]
    check_prompt_logprobs(again, hf_tied, tok)
    assert again["token_ids"] == out["token_ids"]
    # And a cached prefix from a run without prompt logprobs.
    other = random_prompts(1, [40], vocab=TEXT_VOCAB, seed=116)[0]
    gen(llm, other, greedy(2))
    check_prompt_logprobs(gen(llm, other, params)[0], hf_tied, tok)
    assert_all_free(llm)


def test_prompt_logprobs_under_chunked_prefill(qwen3_tied, hf_tied, tok):
    engine = LLM(qwen3_tied, max_num_batched_tokens=16, **ENGINE)
    try:
        prompt = random_prompts(1, [45], vocab=TEXT_VOCAB, seed=117)[0]
        for _ in range(2):  # the second time its blocks are cached: still every position
            out = gen(engine, prompt, greedy(4, prompt_logprobs=2))[0]
            check_prompt_logprobs(out, hf_tied, tok)
            assert out["token_ids"] == hf_greedy(hf_tied, prompt, 4)
            assert_all_free(engine)
        # Several prompts under the 16-token budget, one of them without prompt logprobs.
        prompts = random_prompts(3, [30, 7, 19], vocab=TEXT_VOCAB, seed=132)
        outs = gen(engine, prompts, [greedy(3, prompt_logprobs=1), greedy(3), greedy(3, prompt_logprobs=3)])
        check_prompt_logprobs(outs[0], hf_tied, tok, 1)
        assert outs[1].prompt_logprobs is None
        check_prompt_logprobs(outs[2], hf_tied, tok, 3)
        assert [o["token_ids"] for o in outs] == [hf_greedy(hf_tied, p, 3) for p in prompts]
        assert_all_free(engine)
    finally:
        engine.exit()


# ---- 12. detokenize=False ------------------------------------------------------------------------


def test_detokenize_false(llm, hf_tied):
    prompt = random_prompts(1, [8], vocab=TEXT_VOCAB, seed=118)[0]
    out = gen(llm, prompt, greedy(6, detokenize=False, logprobs=2, prompt_logprobs=1))[0]
    c = out.outputs[0]
    assert c.text == ""
    assert c.token_ids == hf_greedy(hf_tied, prompt, 6)
    assert all(v.decoded_token is None for entry in c.logprobs for v in entry.values())
    assert all(v.decoded_token is None for entry in out.prompt_logprobs[1:] for v in entry.values())
    with_text = gen(llm, prompt, greedy(6))[0]
    assert with_text["token_ids"] == c.token_ids


# ---- 13. engine seed -----------------------------------------------------------------------------


def test_engine_seed_repeats_unseeded_sampling(qwen3_tied, llm):
    prompts = random_prompts(3, [5, 9], seed=119)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)

    def run(seed: int) -> list[list[int]]:
        engine = LLM(qwen3_tied, seed=seed, **ENGINE)
        try:
            return [o["token_ids"] for o in gen(engine, prompts, params)]
        finally:
            engine.exit()

    seven = run(7)
    assert run(7) == seven
    assert run(8) != seven
    # A request's own seed wins over the engine's.
    own = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
    engine = LLM(qwen3_tied, seed=7, **ENGINE)
    try:
        seeded = gen(engine, prompts[0], own)[0]["token_ids"]
    finally:
        engine.exit()
    assert seeded == gen(llm, prompts[0], own)[0]["token_ids"]


# ---- 14. enable_prefix_caching=False -------------------------------------------------------------


def test_prefix_caching_off(qwen3_tied, llm):
    prompt = random_prompts(1, [40], seed=120)[0]  # two full blocks and a partial one
    params = greedy(5)
    engine = LLM(qwen3_tied, enable_prefix_caching=False, **ENGINE)
    try:
        off = [gen(engine, prompt, params)[0] for _ in range(2)]
        assert [o.num_cached_tokens for o in off] == [0, 0]
        assert_all_free(engine)
    finally:
        engine.exit()
    on = [gen(llm, prompt, params)[0] for _ in range(2)]
    assert on[0].num_cached_tokens == 0 and on[1].num_cached_tokens == 32
    assert all(o["token_ids"] == off[0]["token_ids"] for o in off + on)


# ---- 15. LLMEngine and the original step API -----------------------------------------------------


def test_llm_engine_interface(qwen3_tied, llm):
    engine = LLMEngine.from_engine_args(EngineArgs(model=qwen3_tied, **ENGINE))
    try:
        text = "The quick brown fox"
        ids = random_prompts(1, [12], seed=121)[0]
        params = greedy(7)
        engine.add_request("a", text, params)
        engine.add_request("b", ids, params)
        assert engine.has_unfinished_requests()
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert isinstance(out, RequestOutput)
                if out.finished:
                    assert out.request_id not in finished
                    finished[out.request_id] = out
        assert set(finished) == {"a", "b"}
        expected = gen(llm, [text, ids], params)
        assert finished["a"]["token_ids"] == expected[0]["token_ids"]
        assert finished["b"]["token_ids"] == expected[1]["token_ids"]
        assert finished["a"].prompt == text and finished["b"].prompt_token_ids == ids

        # Abort an unfinished request: it is never reported finished and nothing is left unfinished.
        engine.add_request("c", text, greedy(50))
        engine.add_request("d", ids, greedy(4))
        reported: dict[str, RequestOutput] = {}
        for _ in range(2):
            for out in engine.step():
                reported[out.request_id] = out
        assert "c" in reported and not reported["c"].finished
        engine.abort_request("c")
        while engine.has_unfinished_requests():
            for out in engine.step():
                reported[out.request_id] = out
        assert reported["d"].finished and reported["d"]["token_ids"] == expected[1]["token_ids"][:4]
        assert not reported["c"].finished
        assert not engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 0
        assert engine.step() == []
        assert_all_free(engine)
    finally:
        engine.exit()


def test_llm_engine_step_outputs_grow_and_abort_takes_lists(qwen3_tied, hf_tied):
    engine = LLMEngine.from_engine_args(EngineArgs(model=qwen3_tied, **ENGINE))
    try:
        prompts = random_prompts(3, [9, 20, 6], seed=133)
        engine.add_request("n2", prompts[0], greedy(6, n=2))
        engine.add_request("x", prompts[1], greedy(40))
        engine.add_request("y", prompts[2], greedy(40))
        history: dict[str, list[list[list[int]]]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                history.setdefault(out.request_id, []).append([list(c.token_ids) for c in out.outputs])
            steps += 1
            if steps == 3:
                engine.abort_request(["x", "no-such-id", "y"])  # a list; an unknown id is ignored
        reference = hf_greedy(hf_tied, prompts[0], 6)
        assert history["n2"][-1] == [reference, reference]
        # Every report is cumulative: the completions so far, each a growing prefix of the final one.
        for earlier, later in zip(history["n2"], history["n2"][1:]):
            for a, b in zip(earlier, later):
                assert len(a) <= len(b) and b[: len(a)] == a
        for rid in ("x", "y"):
            final = history[rid][-1][0]
            assert (
                len(final) < 40
                and final == hf_greedy(hf_tied, prompts[int(rid == "y") + 1], 40)[: len(final)]
            )
        assert engine.get_num_unfinished_requests() == 0
        assert_all_free(engine)
    finally:
        engine.exit()


def test_original_add_request_and_step(llm, hf_tied):
    prompts = random_prompts(2, [6, 10], seed=122)
    ids = [llm.add_request(p, greedy(5)) for p in prompts]
    assert all(isinstance(i, int) for i in ids) and ids[0] != ids[1]
    results = {}
    saw_prefill = saw_decode = False
    while not llm.is_finished():
        finished, num_tokens = llm.step()
        saw_prefill |= num_tokens > 0
        saw_decode |= num_tokens < 0
        for rid, token_ids in finished:
            results[rid] = token_ids
    assert saw_prefill and saw_decode
    assert results == {i: hf_greedy(hf_tied, p, 5) for i, p in zip(ids, prompts)}
    assert_all_free(llm)


# ---- 16. chat ------------------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if enable_thinking %}THINK\n{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_template_kwargs_and_generation_prompt(llm, qwen3_tied):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer
    reference_tok = transformers.AutoTokenizer.from_pretrained(qwen3_tied)
    assert tok.encode("Hello, my name is") == reference_tok.encode("Hello, my name is")
    conversation = [{"role": "user", "content": "Hello, my name is"}]
    params = greedy(4)
    think = llm.chat(
        conversation,
        params,
        use_tqdm=False,
        chat_template=TEMPLATE,
        chat_template_kwargs={"enable_thinking": True},
    )[0]
    assert think.prompt == "user: Hello, my name is\nTHINK\nassistant:"
    assert think.prompt_token_ids == tok.encode(think.prompt, add_special_tokens=False)
    assert think["token_ids"] == gen(llm, [think.prompt_token_ids], params)[0]["token_ids"]
    plain = llm.chat(
        conversation,
        params,
        use_tqdm=False,
        chat_template=TEMPLATE,
        chat_template_kwargs={"enable_thinking": False},
    )[0]
    assert plain.prompt == "user: Hello, my name is\nassistant:"
    cont = llm.chat(
        conversation + [{"role": "assistant", "content": "I am"}],
        params,
        use_tqdm=False,
        chat_template=TEMPLATE,
        add_generation_prompt=False,
        continue_final_message=True,
    )[0]
    assert cont.prompt.endswith("assistant: I am") and "THINK" not in cont.prompt
    with pytest.raises(ValueError):
        llm.chat(
            conversation,
            params,
            use_tqdm=False,
            chat_template=TEMPLATE,
            add_generation_prompt=True,
            continue_final_message=True,
        )
    assert_all_free(llm)


def test_chat_renders_like_transformers(llm, qwen3_tied):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking %}THINK{% endif %}"
    reference_tok = transformers.AutoTokenizer.from_pretrained(qwen3_tied)
    one = [{"role": "user", "content": "Hello, my name is"}]
    two = one + [{"role": "assistant", "content": " Grüße"}, {"role": "user", "content": " again"}]
    params = greedy(3)
    outs = llm.chat(
        [one, two],
        params,
        use_tqdm=False,
        chat_template=template,
        chat_template_kwargs={"enable_thinking": True},
    )
    assert [o.prompt for o in outs] == ["Hello, my name isTHINK", "Hello, my name is Grüße againTHINK"]
    for conversation, out in zip([one, two], outs):
        rendered = reference_tok.apply_chat_template(
            conversation,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        assert out.prompt == rendered
        assert out.prompt_token_ids == reference_tok.encode(rendered, add_special_tokens=False)
        assert out["token_ids"] == gen(llm, [out.prompt_token_ids], params)[0]["token_ids"]
    off = llm.chat(one, params, use_tqdm=False, chat_template=template)[0]
    assert off.prompt == "Hello, my name is"
    assert llm.get_tokenizer().encode("Grüße") == reference_tok.encode("Grüße")


# ---- 17. refused values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("logit_bias", dict(logit_bias={512: 1.0})),
        ("logit_bias", dict(logit_bias={3: 1.0, 10_000: -1.0})),
        ("allowed_token_ids", dict(allowed_token_ids=[1, 512])),
        ("logprobs", dict(logprobs=513)),
        ("prompt_logprobs", dict(prompt_logprobs=513)),
    ],
)
def test_out_of_vocabulary_values_are_refused(llm, hf_tied, field, kwargs):
    prompt = random_prompts(1, [6], seed=123)[0]
    good = greedy(4)
    bad = greedy(4, **kwargs)  # valid on its own: only the engine knows the vocabulary
    with pytest.raises(ValueError, match=field):
        gen(llm, prompt, bad)
    with pytest.raises(ValueError, match=field):  # one bad request among good ones queues nothing
        gen(llm, [prompt, prompt], [good, bad])
    with pytest.raises(ValueError, match=field):
        llm.add_request(prompt, bad)
    assert_all_free(llm)
    assert gen(llm, prompt, good)[0]["token_ids"] == hf_greedy(hf_tied, prompt, 4)
    assert_all_free(llm)


def test_n_too_large_for_the_cache_is_refused(qwen3_tied, hf_tied):
    engine = LLM(qwen3_tied, **{**ENGINE, "num_kvcache_blocks": 8})
    try:
        prompt = random_prompts(1, [5], seed=124)[0]  # one partly filled block: each fork needs its own
        too_many = greedy(4, n=9)
        with pytest.raises(ValueError, match="n=9"):
            gen(engine, prompt, too_many)
        assert_all_free(engine)
        out = gen(engine, prompt, greedy(4, n=8))[0]  # exactly fits
        assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_tied, prompt, 4)] * 8
        assert_all_free(engine)
        # Each completion fits alone (3 blocks) but not all four at once (12): preemption, not refusal.
        out = gen(engine, prompt, greedy(40, n=4))[0]
        assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_tied, prompt, 40)] * 4
        assert_all_free(engine)
    finally:
        engine.exit()


def test_max_model_len_ends_with_length(qwen3_tied, hf_tied):
    engine = LLM(qwen3_tied, **{**ENGINE, "max_model_len": 64})
    try:
        prompt = random_prompts(1, [60], seed=134)[0]
        out = gen(engine, prompt, greedy(10))[0]
        assert out["token_ids"] == hf_greedy(hf_tied, prompt, 4)  # 60 + 4 = max_model_len
        assert out["finish_reason"] == "length" and out.outputs[0].stop_reason is None
        assert_all_free(engine)
    finally:
        engine.exit()
