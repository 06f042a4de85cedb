"""SamplingParams: defaults, validation of every field, normalisation, re-validation on assignment."""

import pickle

import numpy as np
import pytest

from nanovllm import SamplingParams

NEW_DEFAULTS = dict(
    n=1,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    repetition_penalty=1.0,
    min_tokens=0,
    logit_bias=None,
    allowed_token_ids=None,
    bad_words=None,
    skip_special_tokens=True,
    spaces_between_special_tokens=True,
    include_stop_str_in_output=False,
    prompt_logprobs=None,
    detokenize=True,
)


def test_new_field_defaults_are_vllms():
    p = SamplingParams()
    for name, value in NEW_DEFAULTS.items():
        assert getattr(p, name) == value, name
    assert p.max_tokens == 64 and p.temperature == 1.0  # the existing defaults stay
    assert not p.needs_logits_processing
    assert not p.needs_truncation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=3),
        dict(presence_penalty=-2),
        dict(presence_penalty=2.0),
        dict(frequency_penalty=1.5),
        dict(frequency_penalty=-2.0),
        dict(repetition_penalty=0.01),
        dict(repetition_penalty=3),
        dict(min_tokens=64),
        dict(min_tokens=0),
        dict(logit_bias={0: 1.0, 7: -3}),
        dict(logit_bias={}),
        dict(allowed_token_ids=[0, 5, 9]),
        dict(bad_words=["hello", "big world"]),
        dict(bad_words=[]),
        dict(skip_special_tokens=False),
        dict(spaces_between_special_tokens=False),
        dict(include_stop_str_in_output=True),
        dict(prompt_logprobs=0),
        dict(prompt_logprobs=5),
        dict(detokenize=False),
    ],
)
def test_valid_values_are_kept(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.0),
        ("n", True),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("presence_penalty", float("nan")),
        ("presence_penalty", "1"),
        ("frequency_penalty", 3),
        ("frequency_penalty", None),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", float("nan")),
        ("min_tokens", -1),
        ("min_tokens", 1.5),
        ("min_tokens", 65),  # > max_tokens (64)
        ("logit_bias", [1.0, 2.0]),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"3": 1.0}),
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {3: float("inf")}),
        ("logit_bias", {3: float("nan")}),
        ("logit_bias", {3: "1"}),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [1, -2]),
        ("allowed_token_ids", [1.0]),
        ("allowed_token_ids", 5),
        ("allowed_token_ids", [True]),
        ("bad_words", "word"),
        ("bad_words", [""]),
        ("bad_words", [3]),
        ("bad_words", 3),
        ("skip_special_tokens", 1),
        ("spaces_between_special_tokens", None),
        ("include_stop_str_in_output", "yes"),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 1.0),
        ("detokenize", 0),
        ("stop", 5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop_token_ids", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", "12"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_stop_and_stop_token_ids_that_are_not_lists():
    with pytest.raises(ValueError, match="SamplingParams.stop "):
        SamplingParams(stop=5)
    with pytest.raises(ValueError, match="SamplingParams.stop_token_ids"):
        SamplingParams(stop_token_ids=5)


def test_stop_token_ids_accept_numpy_integers():
    p = SamplingParams(stop_token_ids=np.array([3, 7], dtype=np.int64))
    assert p.stop_token_ids == [3, 7]
    assert all(type(t) is int for t in p.stop_token_ids)
    p = SamplingParams(
        stop_token_ids=[np.int32(4)], allowed_token_ids=[np.uint16(2)], logit_bias={np.int64(1): 2}
    )
    assert p.stop_token_ids == [4] and type(p.stop_token_ids[0]) is int
    assert p.allowed_token_ids == [2] and type(p.allowed_token_ids[0]) is int
    assert p.logit_bias == {1: 2.0} and type(next(iter(p.logit_bias))) is int


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="SamplingParams.stop.*detokenize"):
        SamplingParams(stop="x", detokenize=False)
    SamplingParams(stop_token_ids=[3], detokenize=False)  # token stops are fine without text


def test_greedy_sampling_allows_several_identical_completions():
    # vLLM's offline examples ask for n greedy completions (its TPU example); they are identical.
    assert SamplingParams(temperature=0.0, n=2).n == 2
    with pytest.raises(ValueError, match="SamplingParams.n"):
        SamplingParams(n=0)


def test_logit_bias_is_clamped_to_plus_minus_100():
    p = SamplingParams(logit_bias={1: 250, 2: -1e9, 3: 99.5, 4: -7})
    assert p.logit_bias == {1: 100.0, 2: -100.0, 3: 99.5, 4: -7.0}
    assert all(type(v) is float for v in p.logit_bias.values())


def test_normalisation():
    p = SamplingParams(
        stop="end", presence_penalty=1, frequency_penalty=-1, repetition_penalty=2, bad_words=("a", "b", "a")
    )
    assert p.stop == ["end"]
    assert type(p.presence_penalty) is float and p.presence_penalty == 1.0
    assert type(p.frequency_penalty) is float and type(p.repetition_penalty) is float
    assert p.bad_words == ["a", "b"]  # duplicates dropped, as vLLM does


def test_bad_assignment_raises_and_keeps_the_old_value():
    p = SamplingParams(temperature=0.7, max_tokens=10, min_tokens=5, stop=["x"])
    cases = [
        ("temperature", -1, ValueError),
        ("temperature", "hot", TypeError),
        ("max_tokens", 4, ValueError),  # below min_tokens: the cross-field rule
        ("min_tokens", 11, ValueError),
        ("presence_penalty", 9, ValueError),
        ("stop", 5, ValueError),
        ("stop_token_ids", 5, ValueError),
        ("detokenize", False, ValueError),  # stop strings are set
        ("logit_bias", {1: float("nan")}, ValueError),
        ("n", 0, ValueError),
    ]
    for name, value, exc in cases:
        before = getattr(p, name)
        with pytest.raises(exc, match=f"SamplingParams.{name}"):
            setattr(p, name, value)
        assert getattr(p, name) == before, name
    assert p == SamplingParams(temperature=0.7, max_tokens=10, min_tokens=5, stop=["x"])


def test_good_assignment_normalises():
    p = SamplingParams()
    p.stop = "x"
    assert p.stop == ["x"]
    p.presence_penalty = 1
    assert type(p.presence_penalty) is float
    p.stop_token_ids = np.array([5])
    assert p.stop_token_ids == [5] and type(p.stop_token_ids[0]) is int
    p.logit_bias = {3: 1000}
    assert p.logit_bias == {3: 100.0}
    p.temperature = 0
    assert type(p.temperature) is float
    p.max_tokens = 3
    p.min_tokens = 3
    assert (p.max_tokens, p.min_tokens) == (3, 3)
    with pytest.raises(AttributeError):
        p.not_a_field = 1  # slots: no stray attributes


def test_needs_logits_processing():
    assert not SamplingParams(temperature=0.5, top_k=3, logprobs=2).needs_logits_processing
    for kwargs in [
        dict(presence_penalty=0.5),
        dict(frequency_penalty=-0.1),
        dict(repetition_penalty=1.1),
        dict(min_tokens=1),
        dict(logit_bias={1: 0.5}),
        dict(allowed_token_ids=[1]),
        dict(bad_words=["x"]),
    ]:
        assert SamplingParams(**kwargs).needs_logits_processing, kwargs
    assert not SamplingParams(logit_bias={}, bad_words=[]).needs_logits_processing
    p = SamplingParams()
    p.repetition_penalty = 1.2  # the stored flag follows assignments
    assert p.needs_logits_processing
    p.repetition_penalty = 1.0
    assert not p.needs_logits_processing
    p.allowed_token_ids = [3]
    assert p.clone().needs_logits_processing
    assert SamplingParams(top_p=0.9).needs_truncation


def test_clone_is_an_independent_copy():
    p = SamplingParams(
        stop=["x"], stop_token_ids=[1], logit_bias={2: 1.0}, allowed_token_ids=[3], bad_words=["w"]
    )
    q = p.clone()
    assert q == p and q is not p
    for name in ("stop", "stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words"):
        assert getattr(q, name) is not getattr(p, name), name
    q.stop.append("y")
    assert p.stop == ["x"]
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        q.top_p = 0.0  # the copy validates assignments too


def test_pickle_round_trip_keeps_validation():
    p = SamplingParams(stop="x", logit_bias={1: 2.0}, min_tokens=2)
    q = pickle.loads(pickle.dumps(p))
    assert q == p
    with pytest.raises(ValueError, match="SamplingParams.min_tokens"):
        q.min_tokens = 100
