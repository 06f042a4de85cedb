"""The streamed chunks are written as JSON directly (no json.dumps of a dict per request per step):
byte for byte what json.dumps wrote for the same dict, for awkward text too."""

import json

import pytest

from nanovllm.entrypoints.openai.serving_engine import SSEChunks, json_value, stream_choice

TEXTS = ["", " hello", 'quo"te \\ back', "new\nline\ttab\x00\x1f", "Grüße, 你好 🙂", "\ud83d", "</script>"]
REASONS = [(None, None), ("length", None), ("stop", 151645), ("stop", "###"), ("abort", None)]
LOGPROBS = [
    None,
    {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}], "text_offset": [0]},
]


def dumped(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


@pytest.mark.parametrize("value", [None, "x", 'a"b', "ü", 0, 151645, -1, 2.5, True])
def test_json_value_is_json_dumps(value):
    assert json_value(value) == json.dumps(value)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason,stop_reason", REASONS)
@pytest.mark.parametrize("logprobs", LOGPROBS)
def test_choices_are_json_dumps_of_their_dicts(text, finish_reason, stop_reason, logprobs):
    got = stream_choice(3, text, logprobs, finish_reason, stop_reason)
    want = {
        "index": 3,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
    assert got == json.dumps(want)
    got = stream_choice(1, text, logprobs, finish_reason, stop_reason, chat=True)
    want = {
        "index": 1,
        "delta": {"content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
    assert got == json.dumps(want)


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}])
def test_lines_are_json_dumps_of_the_chunk(usage):
    sse = SSEChunks('cmpl-"1"', "text_completion", 1700000000, "Qwen/Qwen3-0.6B ü")
    head = {
        "id": 'cmpl-"1"',
        "object": "text_completion",
        "created": 1700000000,
        "model": "Qwen/Qwen3-0.6B ü",
    }
    choices = [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]
    for some in ([], choices[:1], choices):
        body = head | {"choices": some} | ({} if usage is None else {"usage": usage})
        assert sse.line([json.dumps(c) for c in some], usage) == dumped(body)
