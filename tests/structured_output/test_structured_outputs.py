"""Structured outputs on a tiny random model: the constraint alone must make the output valid."""

import json
import re

import jsonschema
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.sampling_params import StructuredOutputsParams
from tests.conftest import random_prompts

CONFIG = dict(kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512, enforce_eager=True)
CHOICES = ["Positive", "Negative", "Neutral"]
REGEX = r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)"
SCHEMA = {
    "type": "object",
    "properties": {
        "brand": {"type": "string", "enum": ["acme", "globex", "initech"]},
        "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
        "electric": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["brand", "year", "electric"],
    "additionalProperties": False,
}
# The shape of vLLM's SQL example grammar: a SELECT of a column from a table with one condition.
SQL_GRAMMAR = r"""
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
SQL = re.compile(r"SELECT col_[12]  from table_[12]  where col_[12] = [12] ")


def constrained(temperature: float = 0.0, max_tokens: int = 96, seed=None, n: int = 1, **constraint):
    return SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        n=n,
        structured_outputs=StructuredOutputsParams(**constraint),
    )


def check(kind: str, text: str) -> None:
    if kind == "choice":
        assert text in CHOICES
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert SQL.fullmatch(text), text


PARAMS = {
    "choice": dict(choice=CHOICES),
    "regex": dict(regex=REGEX),
    "json": dict(json=SCHEMA, disable_any_whitespace=True),
    "grammar": dict(grammar=SQL_GRAMMAR),
}


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    engine = LLM(qwen3_tied, **CONFIG)
    yield engine
    engine.exit()


def assert_idle(llm: LLM) -> None:
    assert llm.is_finished()
    llm.block_manager.check_integrity()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("kind", list(PARAMS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constraint_makes_the_output_valid(llm, kind, temperature):
    prompts = random_prompts(4, [3, 11, 25, 40], seed=5) + ["Classify this sentiment: vLLM is wonderful!"]
    params = constrained(temperature, seed=3 if temperature else None, **PARAMS[kind])
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        check(kind, completion.text)
    assert_idle(llm)


def test_json_object_parses(llm):
    out = llm.generate(
        ["Give me a JSON object"], constrained(max_tokens=200, json_object=True), use_tqdm=False
    )[0]
    text = out.outputs[0].text
    if out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may keep a string open: what it wrote is still a JSON object's prefix
        assert text.lstrip().startswith("{")


def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(llm):
    prompts = random_prompts(4, [7, 19, 33, 12], seed=9)
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    mixed_params = [plain, constrained(**PARAMS["json"]), plain, constrained(**PARAMS["choice"])]
    mixed = llm.generate(prompts, mixed_params, use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0]
    assert mixed[2].outputs[0].token_ids == alone[2]
    check("json", mixed[1].outputs[0].text)
    check("choice", mixed[3].outputs[0].text)
    assert_idle(llm)


def test_preemption_and_prefix_hits_keep_the_constrained_output(qwen3_tied, llm):
    # Shared 32-token prefixes (prefix-cache hits) and a cache too small for all at once (preemption).
    base = random_prompts(1, [32], seed=13)[0]
    prompts = [base + [i + 1] for i in range(6)]
    params = [constrained(**PARAMS["json" if i % 2 else "grammar"]) for i in range(6)]
    roomy = llm.generate(prompts, params, use_tqdm=False)
    tight = LLM(qwen3_tied, **{**CONFIG, "num_kvcache_blocks": 12, "max_num_batched_tokens": 40})
    preempted = []
    preempt = tight.scheduler.preempt

    def spy(seq):
        preempted.append(seq.seq_id)
        preempt(seq)

    tight.scheduler.preempt = spy
    squeezed = tight.generate(prompts, params, use_tqdm=False)
    assert preempted, "the small cache did not preempt"
    for a, b in zip(roomy, squeezed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for i, out in enumerate(squeezed):
        check("json" if i % 2 else "grammar", out.outputs[0].text)
    assert_idle(tight)
    tight.exit()


def test_n_completions_each_follow_the_grammar(llm):
    out = llm.generate(["pick"], constrained(1.0, seed=11, n=4, **PARAMS["regex"]), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        check("regex", completion.text)
    assert len({c.text for c in out.outputs}) > 1  # each completion has its own matcher and draw
    assert_idle(llm)


def test_stream_of_a_constrained_request_joins_to_generate(llm):
    params = constrained(**PARAMS["grammar"])
    text = "".join(item["text"] for item in llm.stream(["stream it"], params))
    assert text == llm.generate(["stream it"], params, use_tqdm=False)[0].outputs[0].text
    check("grammar", text)


@pytest.mark.parametrize(
    "constraint, match",
    [
        (dict(json='{"type": "object", "properties": '), "JSON schema"),
        (dict(regex="[a-z"), "regex"),
        (dict(grammar="root ::= undefined_rule"), "grammar"),
    ],
)
def test_invalid_constraints_are_refused_and_the_engine_stays_usable(llm, constraint, match):
    good = random_prompts(2, [5, 9], seed=2)
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(good, plain, use_tqdm=False)]
    with pytest.raises(ValueError, match=match):
        llm.generate(good, [plain, constrained(**constraint)], use_tqdm=False)
    assert_idle(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(good, plain, use_tqdm=False)] == expected


def test_structured_outputs_params_takes_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_one_compiled_grammar_per_distinct_constraint(llm):
    manager = llm._structured
    a = manager.compile(StructuredOutputsParams(json=SCHEMA))
    b = manager.compile(StructuredOutputsParams(json=json.dumps(SCHEMA, sort_keys=True)))
    c = manager.compile(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    assert a is b and a is not c


def test_overlap_continues_for_unconstrained_rows(qwen3_tied):
    # With overlap scheduling a constrained row sits out the step after each of its own (its mask needs
    # the token in flight) while the unconstrained rows decode every step.
    llm = LLM(qwen3_tied, **CONFIG)
    decode_batches = []
    launch = llm.model_runner.launch

    def recording(batch, **kwargs):
        if not batch.is_prefill:
            decode_batches.append({seq.seq_id for seq in batch.seqs})
        return launch(batch, **kwargs)

    llm.model_runner.launch = recording
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs = llm.generate(
        random_prompts(2, [6, 9], seed=4), [plain, constrained(**PARAMS["grammar"])], use_tqdm=False
    )
    check("grammar", outs[1].outputs[0].text)
    plain_id, grammar_id = (int(o.request_id) for o in outs)
    assert sum(plain_id in b for b in decode_batches) == 29  # every decode step after the prefill's token
    # While the plain request runs (alone, the constrained one waits for each token instead).
    last_plain = max(i for i, b in enumerate(decode_batches) if plain_id in b)
    with_grammar = [i for i, b in enumerate(decode_batches[: last_plain + 1]) if grammar_id in b]
    assert len(with_grammar) >= 5 and all(b - a == 2 for a, b in zip(with_grammar, with_grammar[1:]))
    llm.exit()


def test_bitmask_rows_and_padding_ids(llm):
    """The step's bitmask (xgrammar's batch fill) equals each matcher's own fill; the model's vocabulary
    ids past the tokenizer's are never allowed; applied to the logits (the CPU path), it leaves -inf
    exactly where xgrammar's own apply does and the other rows untouched."""
    import xgrammar as xgr

    from nanovllm.structured_output.manager import apply_token_bitmask

    manager = llm._structured
    vocab = llm.config.hf_config.vocab_size
    assert len(llm.tokenizer) < vocab  # the tiny model pads its vocabulary, as real ones often do
    grammars = [manager.compile(StructuredOutputsParams(**PARAMS[k])) for k in ("json", "choice", "regex")]
    matchers = [manager.new_matcher(g) for g in grammars]
    assert matchers[0].accept_token(llm.tokenizer.encode("{")[0])  # a state past the first
    rows = [4, 0, 2]
    mask = manager.bitmask(matchers, rows)
    assert mask.rows.tolist() == rows and mask.bitmask.shape == (3, (vocab + 31) // 32)
    own = xgr.allocate_token_bitmask(3, vocab)
    for i, m in enumerate(matchers):
        m.fill_next_token_bitmask(own, i)
    assert torch.equal(mask.bitmask, own)
    bits = (mask.bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert not bits.reshape(3, -1)[:, len(llm.tokenizer) : vocab].any()
    logits = torch.randn(5, vocab)
    theirs = logits.clone()
    apply_token_bitmask(logits, mask)
    for i, row in enumerate(rows):
        masked = theirs[row : row + 1].clone()
        xgr.apply_token_bitmask_inplace(masked, own[i : i + 1], vocab_size=vocab)
        theirs[row] = masked[0]
    assert torch.equal(logits, theirs)
    assert torch.isinf(logits[rows]).any() and not torch.isinf(logits[[1, 3]]).any()


def test_logprobs_of_a_constrained_row_are_the_model_s(llm):
    """The mask works on a copy when the row asks for logprobs: the first sampled token's logprob is the
    model's own (the prompt logprob of that token after the same prompt), not renormalised over the
    tokens the grammar allows."""
    prompt = random_prompts(1, [17], seed=31)[0]
    params = constrained(max_tokens=8, **PARAMS["choice"])
    params.logprobs = 0
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    first = out.token_ids[0]
    sampled = out.logprobs[0][first].logprob
    check_params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    model = (
        llm.generate([prompt + [first]], check_params, use_tqdm=False)[0].prompt_logprobs[-1][first].logprob
    )
    assert sampled == pytest.approx(model, abs=1e-4)
