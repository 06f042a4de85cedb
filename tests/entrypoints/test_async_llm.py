"""AsyncLLM on a tiny random model: its streams against LLM.generate on the same checkpoint, requests
batched into shared steps, early exits and aborts freeing every block, bad input refused while the
engine keeps serving. Every wait is bounded (asyncio.wait_for)."""

import asyncio
import json

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.async_llm import AsyncLLM
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import StructuredOutputsParams
from tests.conftest import random_prompts

CONFIG = dict(
    kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512, enforce_eager=True, device="cpu"
)
WAIT_S = 60.0


@pytest.fixture(scope="module")
def engines(qwen3_tied):
    reference = LLM(qwen3_tied, **CONFIG)
    engine = AsyncLLM(LLMEngine(qwen3_tied, **CONFIG))
    yield engine, reference
    engine.shutdown()
    reference.exit()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def assert_idle(engine: AsyncLLM) -> None:
    inner = engine.engine
    bm = inner.block_manager
    assert inner.get_num_unfinished_requests() == 0
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


async def abort_reached(engine: AsyncLLM) -> None:
    """Give an abort up to about 2 s to reach the engine thread (it does so between steps)."""
    for _ in range(200):
        if engine.engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)


async def collect(engine: AsyncLLM, request_id: str, prompt, params) -> tuple[dict, list]:
    """Join a request's updates: per completion (text, token ids, finish_reason); also the updates."""
    out: dict[int, list] = {}
    updates = []
    async for update in engine.generate(prompt, params, request_id):
        updates.append(update)
        for d in update.completions:
            text, ids, _ = out.get(d.index, ("", [], None))
            out[d.index] = (text + d.text, ids + d.token_ids, d.finish_reason)
    return out, updates


def test_streams_equal_generate_and_share_steps(engines):
    engine, reference = engines
    prompts = random_prompts(6, [5, 9, 17, 30], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = reference.generate(prompts, params, use_tqdm=False)

    async def main():
        return await asyncio.gather(
            *(collect(engine, f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts))
        )

    steps_before = engine.num_steps
    results = run(main())
    for (out, updates), exp in zip(results, expected):
        text, ids, reason = out[0]
        assert ids == exp.outputs[0].token_ids
        assert text == exp.outputs[0].text
        assert reason == "length" and updates[-1].finished
    # Batched: the six requests were decoded in the same steps (alone they need ~6 x 10 steps).
    steps = engine.num_steps - steps_before
    assert steps < 2 * 10 + 6, steps
    # Some step gave all six a token (each update records the step that made it).
    steps_of = [{u.step for u in updates} for _, updates in results]
    assert set.intersection(*steps_of), steps_of
    assert_idle(engine)


def test_n_and_seed_equal_generate(engines):
    engine, reference = engines
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=11, ignore_eos=True, logprobs=1)
    exp = reference.generate(["Hello, my name is"], params, use_tqdm=False)[0]
    out, updates = run(collect(engine, "n3", "Hello, my name is", params))
    assert sorted(out) == [0, 1, 2]
    for c in exp.outputs:
        assert out[c.index][1] == c.token_ids
        assert out[c.index][0] == c.text
    got = [lp for u in updates for d in u.completions if d.index == 1 for lp in d.logprobs]
    assert [{t: round(v.logprob, 4) for t, v in d.items()} for d in got] == [
        {t: round(v.logprob, 4) for t, v in d.items()} for d in exp.outputs[1].logprobs
    ]
    assert_idle(engine)


def test_leaving_a_stream_early_aborts_it(engines):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        seen = 0
        async for update in engine.generate("The quick brown fox", params, "early"):
            seen += sum(len(d.token_ids) for d in update.completions)
            if seen >= 3:
                break
        await abort_reached(engine)

    run(main())
    assert_idle(engine)


def test_abort_ends_the_stream_with_abort(engines):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        reasons = []
        async for update in engine.generate("The quick brown fox", params, "to-abort"):
            reasons += [d.finish_reason for d in update.completions]
            if len(reasons) == 2:
                await engine.abort("to-abort")
        return reasons

    reasons = run(main())
    assert reasons[-1] == "abort"
    assert_idle(engine)


def test_cancelled_task_aborts(engines):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def main():
        task = asyncio.create_task(collect(engine, "cancel-me", "Hello", params))
        while engine.engine.get_num_unfinished_requests() == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await abort_reached(engine)

    run(main())
    assert_idle(engine)


def test_bad_input_is_refused_and_the_engine_goes_on(engines):
    engine, reference = engines
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.add_request("bad", {"prompt_token_ids": [1, 99999]}, params)
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad2", {"prompt_token_ids": []}, params)
        return await collect(engine, "good", "Hello", params)

    out, _ = run(main())
    assert out[0][1] == reference.generate(["Hello"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert_idle(engine)


def test_stats(engines):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def main():
        updates = await engine.add_request("stats", "Hello", params)
        async for _ in updates:
            stats = await engine.get_stats()
            break
        await updates.aclose()
        return stats

    stats = run(main())
    assert stats.num_running == 1 and stats.num_waiting == 0
    assert 0 < stats.kv_cache_usage < 1 and stats.num_kv_blocks == 64


def test_cancelled_before_acceptance_aborts(engines):
    """Cancelled while the engine thread has not yet taken it: it is added, then aborted at once
    (run to the end it would need ~500 steps, up to max_model_len)."""
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    steps_before = engine.num_steps

    async def main():
        task = asyncio.create_task(engine.add_request("cancel-early", "Hello", params))
        await asyncio.sleep(0)  # the task has queued the request and waits for its acceptance
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        quiet = 0  # polls in a row with nothing queued or running (the thread may hold it in between)
        for _ in range(500):
            await asyncio.sleep(0.01)
            idle = engine.engine.get_num_unfinished_requests() == 0 and not engine._inbox
            quiet = quiet + 1 if idle else 0
            if quiet == 10:
                break

    run(main())
    assert engine.num_steps - steps_before < 50
    assert_idle(engine)


@pytest.mark.parametrize("how", ["aclose", "drop"])
def test_a_stream_closed_or_dropped_unread_aborts(engines, how):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    steps_before = engine.num_steps

    async def main():
        updates = await engine.add_request(f"unread-{how}", "Hello", params)
        if how == "aclose":
            await updates.aclose()
        else:
            del updates  # the last reference: the finalizer aborts it
        for _ in range(500):
            await asyncio.sleep(0.01)
            if engine.engine.get_num_unfinished_requests() == 0 and not engine._inbox:
                break

    run(main())
    assert engine.num_steps - steps_before < 50  # run to the end it needs ~500 steps
    assert_idle(engine)


async def inbox_holds(engine: AsyncLLM, n: int) -> list[str]:
    """With the inbox's lock held (the engine thread cannot take it), wait for `n` posted items; their
    kinds ("add"/"abort") in order."""
    for _ in range(1000):
        if len(engine._inbox) >= n:
            break
        await asyncio.sleep(0.005)
    return [item[0] for item in engine._inbox]


def test_an_id_cancelled_and_sent_again_in_one_inbox_batch(engines):
    """A client cancels a request and resends it under the same id before the engine thread looks:
    the thread takes [abort x, add x] at once. The abort goes first, so the new request is accepted,
    and the old request's final (abort) update goes to the old stream, not to the new one."""
    engine, reference = engines
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = reference.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]

    async def main():
        first = await engine.add_request("reused", "The quick brown fox", long)
        await first.__anext__()  # it is running
        with engine._cond:  # reentrant: posting from this thread still works
            await first.aclose()  # posts the abort
            again = asyncio.create_task(collect(engine, "reused", "Hello", params))
            kinds = await inbox_holds(engine, 2)
        out, updates = await again
        return kinds, out, updates

    kinds, out, updates = run(main())
    assert kinds == ["abort", "add"]  # one batch, in this order
    text, ids, reason = out[0]
    assert ids == expected.token_ids and text == expected.text
    assert reason == "length"
    assert [d.finish_reason for u in updates for d in u.completions][:-1] == [None] * (len(updates) - 1)
    assert_idle(engine)


def test_a_grammar_is_compiled_before_the_engine_thread_takes_the_request(engines):
    """The async engine compiles a constraint in a worker thread before posting the request (a large
    schema would stall every running stream on the engine thread); the engine's own compile is then a
    cache hit, and the output is the offline engine's."""
    engine, reference = engines
    schema = {"type": "string", "enum": ["alpha", "beta", "gamma"]}
    constraint = StructuredOutputsParams(json=schema)
    params = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=constraint)
    expected = reference.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]
    cache = engine.engine._structured._grammars
    assert constraint.key() not in cache

    async def main():
        with engine._cond:  # the engine thread cannot take the request meanwhile
            task = asyncio.create_task(collect(engine, "schema", "Hello", params))
            kinds = await inbox_holds(engine, 1)
            grammar = cache.get(constraint.key())  # compiled before it was posted
        out, _ = await task
        return kinds, grammar, out

    size = len(cache)
    kinds, grammar, out = run(main())
    assert kinds == ["add"] and grammar is not None
    assert len(cache) == size + 1 and cache[constraint.key()] is grammar  # the engine's compile: a hit
    text, ids, reason = out[0]
    assert json.loads(text) in schema["enum"]
    assert ids == expected.token_ids and reason == expected.finish_reason
    assert_idle(engine)


@pytest.mark.parametrize(
    "constraint,message",
    [
        (dict(json='{"type": "object", "properties": '), "invalid JSON schema"),
        (dict(regex="[a-z"), "invalid regex"),
        (dict(grammar="root ::= undefined_rule"), "invalid grammar"),
    ],
)
def test_an_invalid_constraint_is_refused_before_the_engine_thread(engines, constraint, message):
    engine, reference = engines
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        with engine._cond:  # refused in add_request itself: the engine thread never sees it
            with pytest.raises(ValueError, match=f"structured_outputs: {message}"):
                await asyncio.wait_for(engine.add_request("bad-constraint", "Hello", bad), 30)
            assert not engine._inbox
        return await collect(engine, "after-bad-constraint", "Hello", params)

    out, _ = run(main())
    assert out[0][1] == reference.generate(["Hello"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert_idle(engine)


def test_stats_come_between_steps_under_load(engines):
    """get_stats is answered by the engine thread between two steps: a reader keeping the engine stepping
    back to back does not hold it off until the requests end."""
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # 4 x 13 of the 64 blocks

    async def main():
        streams = [await engine.add_request(f"load-{i}", "Hello", params) for i in range(4)]

        async def read(stream):
            return sum(len(d.token_ids) for u in [u async for u in stream] for d in u.completions)

        readers = [asyncio.create_task(read(s)) for s in streams]
        stats = [await asyncio.wait_for(engine.get_stats(), 5) for _ in range(5)]
        return stats, await asyncio.gather(*readers)

    stats, counts = run(main())
    assert all(s.num_running == 4 for s in stats), stats
    assert counts == [200] * 4
    assert_idle(engine)


def _joined(updates: list) -> dict:
    """Per completion: (text, token ids, log-probabilities rounded, finish reason) of all updates."""
    out: dict[int, tuple] = {}
    for update in updates:
        for d in update.completions:
            text, ids, lps, _ = out.get(d.index, ("", [], [], None))
            lps = lps + [{t: round(v.logprob, 4) for t, v in e.items()} for e in d.logprobs or []]
            out[d.index] = (text + d.text, ids + d.token_ids, lps, d.finish_reason)
    return out


def _expected(c) -> tuple:
    return (
        c.text,
        c.token_ids,
        [{t: round(v.logprob, 4) for t, v in e.items()} for e in c.logprobs],
        "length",
    )


async def _unfinished_until_done(engine: AsyncLLM) -> None:
    for _ in range(2000):
        if engine.engine.get_num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the request did not finish")


def test_a_reader_behind_gets_every_token_coalesced(engines):
    """A reader that stops reading holds no queue of per-step updates: once it has taken an update, the
    next one is built and then kept, unread, with every later token (the final update merged into it).
    Read after the request has finished, the stream is two updates whose text, tokens, log-probabilities
    and finish reasons are those of generate."""
    engine, reference = engines
    params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=30, ignore_eos=True, logprobs=2)
    exp = reference.generate(["The quick brown fox"], params, use_tqdm=False)[0]

    async def main():
        stream = await engine.add_request("behind", "The quick brown fox", params)
        first = await stream.__anext__()
        await _unfinished_until_done(engine)  # 30 steps, nothing read meanwhile
        return [first] + [u async for u in stream]

    updates = run(main())
    assert len(updates) == 2 and updates[-1].finished
    got = _joined(updates)
    assert got == {c.index: _expected(c) for c in exp.outputs}
    assert_idle(engine)


def test_a_stream_read_only_at_the_end_is_one_update(engines):
    """Nothing read until the request ends: its first update (with the prompt's log-probabilities) and
    everything after it arrive merged, as one update equal to generate's output."""
    engine, reference = engines
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    exp = reference.generate(["Hello, my name is"], params, use_tqdm=False)[0]

    async def main():
        stream = await engine.add_request("at-the-end", "Hello, my name is", params)
        await _unfinished_until_done(engine)
        return [u async for u in stream]

    (update,) = run(main())
    assert update.finished
    assert _joined([update]) == {0: _expected(exp.outputs[0])}
    rounded = [
        None if e is None else {t: round(v.logprob, 4) for t, v in e.items()} for e in update.prompt_logprobs
    ]
    assert rounded == [
        None if e is None else {t: round(v.logprob, 4) for t, v in e.items()} for e in exp.prompt_logprobs
    ]
    assert_idle(engine)
