"""The OpenAI-compatible server driven by the official `openai` client (sync and async, whole and
streamed) and raw HTTP, every answer checked against the offline `LLM` on the same checkpoint.
After each scenario every KV block is free again. Every loop is bounded in count and time."""

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanovllm import SamplingParams
from nanovllm.sampling_params import StructuredOutputsParams
from tests.entrypoints.conftest import API_KEY, MODEL_NAME

PROMPT = "Hello, my name is"
PROMPTS = [PROMPT, "The quick brown fox", "Grüße aus München!"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is paged attention?"},
]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as c:
        yield c


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def offline(reference, prompt, params: SamplingParams):
    return reference.generate([prompt], params, use_tqdm=False)[0]


def metrics(http) -> dict[str, float]:
    """/metrics parsed: {sample name with labels but model_name: value}."""
    text = http.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def assert_error(exc: openai.APIStatusError, status: int, param: str | None = None) -> dict:
    assert exc.status_code == status
    body = exc.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status and body["message"]
    if param is not None:
        assert body["param"] == param, body
    return body


# ---- routes ------------------------------------------------------------------------------------


def test_models_health_and_api_key(server, client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, "alias"]
    assert http.get("/health").status_code == 200
    no_key = httpx.get(server.url + "/health", timeout=TIMEOUT_S)
    assert no_key.status_code == 200  # only /v1 routes need the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers, timeout=TIMEOUT_S)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0, timeout=TIMEOUT_S)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert_error(e.value, 401)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=TIMEOUT_S)
    assert r.status_code == 401
    server.assert_idle()


def test_completion_equals_offline_generate(server, client, reference):
    exp = offline(reference, PROMPT, greedy(12, ignore_eos=True))
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL_NAME
    assert abs(r.created - time.time()) < 120
    (choice,) = r.choices
    assert choice.text == exp.outputs[0].text and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    server.assert_idle()


def test_prompt_forms_and_multiple_prompts(server, client, reference, http):
    params = greedy(6, ignore_eos=True)
    ids = reference.get_tokenizer().encode("The quick brown fox")
    exp = reference.generate(PROMPTS + [ids], params, use_tqdm=False)
    r = client.completions.create(
        model="alias", prompt=PROMPTS, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.model == "alias"
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [e.outputs[0].text for e in exp[:3]]
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in exp[:3])
    r = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == exp[3].outputs[0].text
    two = http.post(
        "/v1/completions",
        json={"prompt": [ids, ids[:3]], "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    ).json()
    assert [c["text"] for c in two["choices"]] == [
        exp[3].outputs[0].text,
        offline(reference, ids[:3], params).outputs[0].text,
    ]
    server.assert_idle()


def test_stream_joined_equals_whole_with_usage(server, client, reference):
    exp = offline(reference, PROMPT, greedy(16, ignore_eos=True))
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len(chunks) > 2
    *deltas, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert all(c.usage is None for c in deltas)
    assert "".join(c.choices[0].text for c in deltas) == exp.outputs[0].text
    assert [c.choices[0].finish_reason for c in deltas][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in deltas[:-1])
    server.assert_idle()


def test_async_client_stream_and_whole(server, reference):
    exp = offline(reference, "Grüße aus München!", greedy(10, ignore_eos=True))

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S
        ) as ac:
            whole = await ac.completions.create(
                model=MODEL_NAME,
                prompt="Grüße aus München!",
                max_tokens=10,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            stream = await ac.completions.create(
                model=MODEL_NAME,
                prompt="Grüße aus München!",
                max_tokens=10,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            joined = "".join([c.choices[0].text async for c in stream])
            chat = await ac.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0
            )
            return whole.choices[0].text, joined, chat

    whole, joined, chat = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert whole == joined == exp.outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    server.assert_idle()


def test_n_with_seed_equals_offline(server, client, reference):
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=1234, ignore_eos=True)
    exp = offline(reference, PROMPT, params)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        seed=1234,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in r.choices] == [c.text for c in exp.outputs]
    assert r.choices[0].text != r.choices[1].text  # completion 1 samples with seed + 1
    assert r.usage.completion_tokens == 16
    # Streamed: the deltas of each choice, joined, are the same two texts.
    texts = ["", ""]
    for chunk in client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        seed=1234,
        temperature=1.0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in exp.outputs]
    server.assert_idle()


def test_sampling_fields_reach_the_engine(server, client, reference):
    fields = dict(top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3)
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.1, min_tokens=3, ignore_eos=True)
    params = SamplingParams(temperature=0.8, max_tokens=10, seed=7, **fields, **extra)
    exp = offline(reference, PROMPT, params)
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0.8, seed=7, extra_body=extra, **fields
    )
    assert r.choices[0].text == exp.outputs[0].text
    unconstrained = offline(
        reference, PROMPT, SamplingParams(temperature=0.8, max_tokens=10, seed=7, ignore_eos=True)
    )
    assert unconstrained.outputs[0].token_ids != exp.outputs[0].token_ids  # the fields changed something
    server.assert_idle()


def test_logprobs_and_echo(server, client, reference):
    exp = offline(reference, PROMPT, greedy(6, ignore_eos=True, logprobs=2, prompt_logprobs=2))
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    want = [d[t].logprob for d, t in zip(exp.outputs[0].logprobs, exp.outputs[0].token_ids)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    tok = reference.get_tokenizer()
    assert lp.tokens == [tok.decode([t]) for t in exp.outputs[0].token_ids]
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # echo: the prompt comes first, with its log-probabilities (the first token has none).
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert c.text == PROMPT + exp.outputs[0].text
    n_prompt = len(exp.prompt_token_ids)
    assert len(c.logprobs.tokens) == n_prompt + 6 and c.logprobs.token_logprobs[0] is None
    want_prompt = [d[t].logprob for d, t in zip(exp.prompt_logprobs[1:], exp.prompt_token_ids[1:])]
    assert c.logprobs.token_logprobs[1:n_prompt] == pytest.approx(want_prompt, abs=1e-4)
    assert c.logprobs.token_logprobs[n_prompt:] == pytest.approx(want, abs=1e-4)
    # echo without logprobs, streamed: the first chunk opens with the prompt.
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(ch.choices[0].text for ch in chunks) == PROMPT + exp.outputs[0].text
    server.assert_idle()


def test_stop_strings(server, client, reference):
    text = offline(reference, PROMPT, greedy(20, ignore_eos=True)).outputs[0].text
    stop = text[5:7]
    assert stop and stop not in text[:6]
    exp = offline(reference, PROMPT, greedy(20, ignore_eos=True, stop=[stop]))
    assert exp.outputs[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    c = r.choices[0]
    assert c.text == exp.outputs[0].text == text[: text.index(stop)]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
    joined = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert joined == c.text
    server.assert_idle()


def test_chat_equals_offline_chat(server, client, reference, http):
    exp = reference.chat(CHAT, greedy(10, ignore_eos=True), use_tqdm=False)[0]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == exp.outputs[0].text
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids) and r.usage.completion_tokens == 10
    # The chat template applied as transformers does it (the rendered prompt's tokens).
    tok = reference.get_tokenizer()
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert exp.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    t = http.post("/tokenize", json={"model": MODEL_NAME, "messages": CHAT}).json()
    assert t["tokens"] == exp.prompt_token_ids and t["count"] == r.usage.prompt_tokens
    # Text parts of a content list are the same message.
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}]}]
    r2 = client.chat.completions.create(
        model=MODEL_NAME, messages=parts, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r2.choices[0].message.content == exp.outputs[0].text
    # Streamed: the role first, then content deltas that join to the same text, then usage.
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    server.assert_idle()


def test_chat_logprobs_and_n(server, client, reference):
    params = SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=5, logprobs=3, ignore_eos=True)
    exp = reference.chat(CHAT, params, use_tqdm=False)[0]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=6,
        temperature=1.0,
        n=2,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.message.content for c in r.choices] == [c.text for c in exp.outputs]
    for choice, want in zip(r.choices, exp.outputs):
        content = choice.logprobs.content
        assert len(content) == 6
        assert [x.logprob for x in content] == pytest.approx(
            [d[t].logprob for d, t in zip(want.logprobs, want.token_ids)], abs=1e-4
        )
        for x in content:
            assert len(x.top_logprobs) == 3
            lps = [t.logprob for t in x.top_logprobs]
            assert lps == sorted(lps, reverse=True) and x.logprob <= lps[0] + 1e-6
            assert x.bytes == list(x.token.encode())
    server.assert_idle()


def test_response_format(server, client, reference):
    schema = {
        "type": "object",
        "properties": {"brand": {"type": "string", "enum": ["acme", "globex"]}, "year": {"type": "integer"}},
        "required": ["brand", "year"],
        "additionalProperties": False,
    }
    exp = reference.chat(
        CHAT, greedy(60, structured_outputs=StructuredOutputsParams(json=schema)), use_tqdm=False
    )[0].outputs[0]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "car", "schema": schema}},
    )
    text = r.choices[0].message.content
    assert text == exp.text and text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), schema)
    exp = reference.chat(
        CHAT, greedy(60, structured_outputs=StructuredOutputsParams(json_object=True)), use_tqdm=False
    )[0].outputs[0]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content == exp.text and exp.text.lstrip().startswith("{")
    # vLLM's structured_outputs field, on completions too.
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    server.assert_idle()


def test_concurrent_requests_share_steps(server, reference, http):
    """32 requests at once: each equals its offline result, and they were decoded together (alone,
    each needs a prefill and 7 decode steps: 256 steps one after another)."""
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    exp = reference.generate(prompts, greedy(8, ignore_eos=True), use_tqdm=False)
    before = metrics(http)
    steps_before = server.engine.num_steps

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S
        ) as ac:

            async def one(p):
                return await ac.completions.create(
                    model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
                )

            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert [r.choices[0].text for r in results] == [e.outputs[0].text for e in exp]
    steps = server.engine.num_steps - steps_before
    assert steps < 128, steps  # one after another: 256
    after = metrics(http)
    count = "vllm:iteration_tokens_total_count"
    one_token = "vllm:iteration_tokens_total_bucket{le=1.0}"
    # Steps that processed more than one token (batched decodes, prefills) were most of them.
    assert (after[count] - before[count]) - (after[one_token] - before[one_token]) >= steps // 2
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 32 * 8
    server.assert_idle()


# ---- errors --------------------------------------------------------------------------------------


BAD_COMPLETIONS = [
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=7), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(logprobs=99), "logprobs"),
    (dict(n=0), "n"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, 2, 99999]), None),
    (dict(presence_penalty=5), "presence_penalty"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(suffix="!"), "suffix"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
]


@pytest.mark.parametrize("fields,param", BAD_COMPLETIONS)
def test_bad_completion_request_is_400_and_the_server_goes_on(server, client, fields, param):
    body = {"prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, extra_body=body, prompt=body.pop("prompt"))
    assert_error(e.value, 400, param)
    server.assert_idle()
    assert (
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2).choices[0].text is not None
    )


def test_bad_chat_requests_and_raw_bodies(server, client, http):
    for kwargs, param in [
        (dict(messages=[]), "messages"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content",
        ),
        (dict(messages=CHAT, top_logprobs=2), "top_logprobs"),
        (
            dict(messages=CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format",
        ),
        (
            dict(messages=CHAT, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
        ),
        # Compiled before the engine thread sees it: still a 400 naming the field.
        (dict(messages=CHAT, extra_body={"structured_outputs": {"json": '{"type": '}}), "structured_outputs"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_NAME, max_tokens=3, **kwargs)
        assert_error(e.value, 400, param)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=3)
    assert_error(e.value, 404, "model")
    # What the client cannot send: a body that is not JSON, a missing field.
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = http.post("/v1/chat/completions", json={"max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    server.assert_idle()
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_over_the_limit_is_503(server, client):
    server.settings.max_concurrent_requests = 1
    try:
        stream = client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
        assert assert_error(e.value, 503)["type"] == "ServiceUnavailableError"
        stream.close()
    finally:
        server.settings.max_concurrent_requests = 0
    server.assert_idle()


# ---- disconnects ------------------------------------------------------------------------------


def test_closed_stream_aborts_and_frees_its_blocks(server, client, http):
    before = metrics(http)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    during = metrics(http)
    assert during["vllm:num_requests_running"] == 1 and during["vllm:kv_cache_usage_perc"] > 0
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metrics(http)
        if now["vllm:num_requests_running"] == 0 and now["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    assert now["vllm:num_requests_running"] == 0 and now["vllm:kv_cache_usage_perc"] == 0
    aborted = "vllm:request_success_total{finished_reason=abort}"
    assert now.get(aborted, 0) - before.get(aborted, 0) == 1
    generated = now["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert 3 <= generated < 400
    server.assert_idle()


def test_client_timeout_on_a_whole_response_aborts_it(server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server.base_url + "/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0},
            timeout=0.5,
        )
    server.assert_idle(timeout=15)


# ---- tokenizer and metrics routes ----------------------------------------------------------------


def test_tokenize_detokenize_round_trip(server, http, reference):
    tok = reference.get_tokenizer()
    text = "Grüße aus München! 你好"
    t = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert t["tokens"] == tok.encode(text) and t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    assert t["token_strs"] == tok.convert_ids_to_tokens(t["tokens"])
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": text}
    r = http.post("/detokenize", json={"tokens": [5, 100000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404


def test_metrics_count_tokens_and_latencies(server, client, http):
    text = http.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success",
        "vllm:iteration_tokens_total",
    ):
        assert name in names, name
    assert f'model_name="{MODEL_NAME}"' in text
    before = metrics(http)
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = metrics(http)

    def diff(name):
        return after[name] - before.get(name, 0)

    assert diff("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert diff("vllm:generation_tokens_total") == r.usage.completion_tokens == 15
    assert diff("vllm:time_to_first_token_seconds_count") == 3
    assert diff("vllm:inter_token_latency_seconds_count") == 3 * 4
    assert diff("vllm:e2e_request_latency_seconds_count") == 3
    assert diff("vllm:request_success_total{finished_reason=length}") == 3
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_example_client_script(server, reference):
    """examples/online_serving/openai_client.py against this server: its completion is the offline one."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / "online_serving" / "openai_client.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--base-url",
            server.base_url,
            "--api-key",
            API_KEY,
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    ).stdout
    want = offline(reference, PROMPT, greedy(8)).outputs[0]
    assert f"model: {MODEL_NAME}" in out
    assert f"completion: {want.text!r} ({len(want.token_ids)} tokens)" in out
    assert "usage:" in out and "completion tokens" in out
    server.assert_idle()


def test_bench_serving_against_this_server(server):
    """benchmarks/bench_serving.py: every request completes with exactly its max_tokens (ignore_eos)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        import bench_serving
    finally:
        sys.path.pop(0)
    args = [
        "--base-url",
        server.url,
        "--model",
        MODEL_NAME,
        "--api-key",
        API_KEY,
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--input-len-range",
        "5",
        "20",
        "--output-len-range",
        "4",
        "9",
        "--max-token-id",
        "400",
    ]
    summary = bench_serving.main(args)
    workload = bench_serving.make_workload(6, 0, (5, 20), (4, 9), 400)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["output_tokens"] == sum(m for _, m in workload)
    assert 0 < summary["chunks_per_output_token"] <= 1
    assert summary["ttft_ms"]["median"] > 0 and summary["tpot_ms"]["median"] > 0
    server.assert_idle()
