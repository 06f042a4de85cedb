"""One engine, many callers: engines in threads, one engine shared by threads, request ownership.

Every result is compared with what a single-threaded engine (or transformers) gives for the same
prompts; after each scenario every KV block is free and the block manager's invariants hold.
"""

import threading
import time

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

BLOCK = 16
CONFIG = dict(kvcache_block_size=BLOCK, num_kvcache_blocks=64, max_model_len=1024, enforce_eager=True)
MAX_TOKENS = 12
# Bounded waits: a thread that has not done its part by then failed (never a condition for passing).
WAIT_S = 60.0


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def assert_idle(llm: LLM) -> None:
    assert llm.is_finished()
    bm = llm.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


def run_threads(*targets) -> list:
    """Run each target in its own thread; re-raise the first exception; results in order."""
    results = [None] * len(targets)
    errors: list[BaseException] = []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive(), "a caller thread did not finish"
    if errors:
        raise errors[0]
    return results


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, [5, 17, 33, 9, 21, 40], seed=71)


@pytest.fixture(scope="module")
def expected_tied(qwen3_tied, prompts):
    with LLM(qwen3_tied, **CONFIG) as llm:
        return [o["token_ids"] for o in llm.generate(prompts, greedy(), use_tqdm=False)]


@pytest.fixture(scope="module")
def expected_untied(qwen3_untied, prompts):
    with LLM(qwen3_untied, **CONFIG) as llm:
        return [o["token_ids"] for o in llm.generate(prompts, greedy(), use_tqdm=False)]


def test_two_engines_in_two_threads_give_their_own_tokens(
    qwen3_tied, qwen3_untied, prompts, expected_tied, expected_untied
):
    # Two models, so a step that read the other engine's metadata or cache would give other tokens.
    a, b = LLM(qwen3_tied, **CONFIG), LLM(qwen3_untied, **CONFIG)
    for _ in range(3):
        out_a, out_b = run_threads(
            lambda: a.generate(prompts, greedy(), use_tqdm=False),
            lambda: b.generate(prompts, greedy(), use_tqdm=False),
        )
        assert [o["token_ids"] for o in out_a] == expected_tied
        assert [o["token_ids"] for o in out_b] == expected_untied
    assert_idle(a)
    assert_idle(b)
    a.exit()
    b.exit()


def test_the_forward_context_belongs_to_each_engine(qwen3_tied, qwen3_untied):
    a, b = LLM(qwen3_tied, **CONFIG), LLM(qwen3_untied, **CONFIG)
    ctx_a, ctx_b = a.model_runner.forward_context, b.model_runner.forward_context
    assert ctx_a is not ctx_b
    layers = a.model_runner.attention_layers + b.model_runner.attention_layers
    assert {id(layer.forward_context) for layer in layers} == {id(ctx_a), id(ctx_b)}
    a.exit()
    b.exit()


def test_callers_in_several_threads_share_one_batch(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG)
    batches = []
    launch = llm.model_runner.launch

    def recording_launch(batch):
        batches.append({seq.seq_id for seq in batch.seqs})
        return launch(batch)

    llm.model_runner.launch = recording_launch
    halves = prompts[:3], prompts[3:]
    # Hold the engine while both callers queue, so neither can start stepping alone: then the first
    # step must be one prefill of all six prompts.
    with llm._exclusive():
        threads = [
            lambda: llm.generate(halves[0], greedy(), use_tqdm=False),
            lambda: [o for o in llm.stream(halves[1], greedy())],
        ]
        holder = {}

        def start():
            holder["results"] = run_threads(*threads)

        runner = threading.Thread(target=start)
        runner.start()
        wait_until(lambda: llm._num_pending == 2, "both callers to queue")
    runner.join(WAIT_S)
    assert not runner.is_alive()
    generated, streamed = holder["results"]
    assert [o["token_ids"] for o in generated] == expected_tied[:3]
    joined = {i: [] for i in range(3)}
    for item in streamed:
        joined[item["index"]] += item["token_ids"]
    assert [joined[i] for i in range(3)] == expected_tied[3:]
    assert len(batches[0]) == 6, "both callers' prompts were not prefilled in one step"
    assert_idle(llm)
    llm.exit()


def test_mixed_entry_points_from_many_threads(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG, max_num_seqs=4)  # fewer slots than requests: queueing and preemption
    conversation = [{"role": "user", "content": "Hello from a thread"}]
    with LLM(qwen3_tied, **CONFIG) as ref:
        chat_expected = ref.chat(conversation, greedy(), use_tqdm=False)[0]["token_ids"]

    def by_generate(i):
        return lambda: [o["token_ids"] for o in llm.generate(prompts[i : i + 2], greedy(), use_tqdm=False)]

    def by_stream(i):
        def run():
            out = {}
            for item in llm.stream(prompts[i : i + 2], greedy()):
                out.setdefault(item["index"], []).extend(item["token_ids"])
            return [out[0], out[1]]

        return run

    results = run_threads(
        by_generate(0),
        by_stream(2),
        by_generate(4),
        lambda: llm.chat(conversation, greedy(), use_tqdm=False)[0]["token_ids"],
    )
    assert results[0] + results[1] + results[2] == expected_tied
    assert results[3] == chat_expected
    assert_idle(llm)
    llm.exit()


# ---- request ownership ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [True, False])
def test_add_request_is_reported_by_step_after_a_generate(qwen3_tied, prompts, expected_tied, overlap):
    llm = LLM(qwen3_tied, **CONFIG, overlap_scheduling=overlap)
    rid = llm.add_request(prompts[0], greedy())
    outputs = llm.generate(prompts[1:3], greedy(), use_tqdm=False)  # steps the first request too
    assert [o["token_ids"] for o in outputs] == expected_tied[1:3]
    reported = {}
    for _ in range(100):
        if llm.is_finished():
            break
        finished, _ = llm.step()
        reported.update(finished)
    assert reported == {rid: expected_tied[0]}
    assert_idle(llm)
    llm.exit()


def test_two_streams_consumed_alternately(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG)
    first, second = llm.stream(prompts[:2], greedy()), llm.stream(prompts[2:4], greedy())
    tokens = {(s, i): [] for s in range(2) for i in range(2)}
    live = {0: first, 1: second}
    while live:
        for s in list(live):
            try:
                item = next(live[s])
            except StopIteration:
                del live[s]
                continue
            tokens[(s, item["index"])] += item["token_ids"]
    assert [tokens[(0, 0)], tokens[(0, 1)], tokens[(1, 0)], tokens[(1, 1)]] == expected_tied[:4]
    assert_idle(llm)
    llm.exit()


def test_aborting_a_streamed_request_finishes_it_with_abort(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG)
    items = []
    aborted = False
    for item in llm.stream(prompts[:2], greedy()):
        items.append(item)
        if item["index"] == 0 and not aborted:
            llm.abort_request(item["request_id"])  # a user action, not an internal error
            aborted = True
    finals = {item["index"]: item for item in items if item["finished"]}
    assert finals[0]["finish_reason"] == "abort"
    assert finals[1]["finish_reason"] == "length"
    assert sum((item["token_ids"] for item in items if item["index"] == 1), []) == expected_tied[1]
    assert_idle(llm)
    llm.exit()


def test_aborting_another_callers_request_from_a_thread(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG)
    victim = {}

    def caller():
        return llm.generate(prompts[:2], [greedy(400), greedy()], use_tqdm=False)

    def running_long_request():
        try:
            requests = list(llm._requests.values())
        except RuntimeError:  # changed while copied: look again
            return None
        return next((r for r in requests if r.index == 0 and len(r.completions[0].known_tokens()) > 2), None)

    def aborter():
        # The generate owns the request; this thread aborts it once it is running.
        wait_until(lambda: running_long_request() is not None, "the generate's requests to run")
        victim["id"] = running_long_request().request_id
        llm.abort_request(victim["id"])

    outputs, _ = run_threads(caller, aborter)
    assert outputs[0].request_id == victim["id"]
    assert outputs[0]["finish_reason"] == "abort" and outputs[0].finished
    head = min(len(outputs[0]["token_ids"]), MAX_TOKENS)
    assert outputs[0]["token_ids"][:head] == expected_tied[0][:head]
    assert outputs[1]["token_ids"] == expected_tied[1]
    assert_idle(llm)
    assert [o["token_ids"] for o in llm.generate(prompts[:2], greedy(), use_tqdm=False)] == expected_tied[:2]
    llm.exit()


@pytest.mark.parametrize("overlap", [True, False])
def test_is_finished_right_after_aborting_the_only_request(qwen3_tied, prompts, expected_tied, overlap):
    llm = LLM(qwen3_tied, **CONFIG, overlap_scheduling=overlap)
    rid = llm.add_request(prompts[0], greedy())
    llm.step()
    llm.step()  # with overlap scheduling a step is in flight now
    llm.abort_request(rid)
    assert llm.is_finished()
    assert_idle(llm)
    assert [o["token_ids"] for o in llm.generate(prompts[:2], greedy(), use_tqdm=False)] == expected_tied[:2]
    llm.exit()


# ---- prompt validation -------------------------------------------------------------------------------


def test_bytes_numpy_and_surrogates(qwen3_tied, prompts, expected_tied):
    llm = LLM(qwen3_tied, **CONFIG)
    with pytest.raises(TypeError, match="bytes"):
        llm.generate([b"hi"], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="surrogate"):
        llm.generate(["caf\ud800"], greedy(), use_tqdm=False)
    as_numpy = [np.array(p, dtype=np.int64) for p in prompts[:2]]
    assert [o["token_ids"] for o in llm.generate(as_numpy, greedy(), use_tqdm=False)] == expected_tied[:2]
    numpy_ints = [[np.int32(t) for t in p] for p in prompts[:2]]
    assert [o["token_ids"] for o in llm.generate(numpy_ints, greedy(), use_tqdm=False)] == expected_tied[:2]
    assert_idle(llm)
    llm.exit()
