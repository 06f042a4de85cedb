"""Reliability through the public API: no hang, no leak, no crash.

Random request mixes on the real engine with a tiny cache (chunking, preemption, prefix hits, requests
arriving while others run) must give the completions of an unconstrained engine and leave every KV block
free; an interrupted `generate` or `step`, an abort, an exit or a request that can never fit must leave
the engine consistent and usable (or, after exit, clearly refuse).
"""

import gc
import math
import random
import threading
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

VOCAB = 512
BLOCK = 16
MAX_PROMPT = 60
MAX_TOKENS = 12
MAX_MODEL_LEN = 128
# The most KV blocks one request of the random mixes can need: a cache this size fits each alone.
MIN_BLOCKS = math.ceil((MAX_PROMPT + MAX_TOKENS) / BLOCK)
BUDGETS = (16, 37, 64)  # max_num_batched_tokens; 37 is not a multiple of the block size


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def make_llm(path: str, **kwargs) -> LLM:
    config = dict(kvcache_block_size=BLOCK, num_kvcache_blocks=MIN_BLOCKS, max_model_len=MAX_MODEL_LEN)
    return LLM(path, **{**config, **kwargs})


def assert_idle(llm: LLM) -> None:
    """Nothing queued or in flight, and every KV block free."""
    assert llm.is_finished()
    bm = llm.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)


def drain(llm: LLM, max_steps: int = 2000) -> dict[int, list[int]]:
    """Step until the engine is idle, checking the blocks after every step; outputs by request id."""
    outputs: dict[int, list[int]] = {}
    for _ in range(max_steps):
        if llm.is_finished():
            return outputs
        finished, _ = llm.step()
        llm.block_manager.check_integrity()
        for seq_id, token_ids in finished:
            assert seq_id not in outputs, f"request {seq_id} reported twice"
            outputs[seq_id] = token_ids
    raise AssertionError(f"the engine did not finish in {max_steps} steps")


class Reference:
    """Greedy completions of an unconstrained engine (a big cache, a big budget), memoized by prompt:
    the completion for max_tokens=n is the first n tokens of the one for MAX_TOKENS."""

    def __init__(self, path: str):
        self.llm = make_llm(path, num_kvcache_blocks=128)
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def ensure(self, prompts: list[list[int]]) -> None:
        new = list(dict.fromkeys(tuple(p) for p in prompts if tuple(p) not in self.cache))
        if new:
            outs = self.llm.generate([list(p) for p in new], greedy(MAX_TOKENS), use_tqdm=False)
            for prompt, out in zip(new, outs):
                self.cache[prompt] = out["token_ids"]

    def __call__(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
        assert max_tokens <= MAX_TOKENS
        self.ensure([prompt])
        return self.cache[tuple(prompt)][:max_tokens]


@pytest.fixture(scope="module")
def reference(qwen3_tied):
    ref = Reference(qwen3_tied)
    yield ref
    ref.llm.exit()


# ---- property: random request mixes on a small cache ------------------------------------------------


class EnginePool:
    """One engine per (overlap, budget), created on first use and reused by every later example."""

    def __init__(self, path: str):
        self.path = path
        self.engines: dict[tuple[bool, int], LLM] = {}
        self.reuses = 0

    def get(self, key: tuple[bool, int]) -> LLM:
        if key in self.engines:
            self.reuses += 1
        else:
            overlap, budget = key
            self.engines[key] = make_llm(self.path, overlap_scheduling=overlap, max_num_batched_tokens=budget)
        return self.engines[key]

    def discard(self, key: tuple[bool, int]) -> None:
        """Drop an engine a failed example may have left busy, so the next examples start clean."""
        engine = self.engines.pop(key, None)
        if engine is not None:
            engine.exit()


@pytest.fixture(scope="module")
def pool(qwen3_tied):
    engines = EnginePool(qwen3_tied)
    yield engines
    for engine in engines.engines.values():
        engine.exit()
    assert engines.reuses > 0, "no engine served two examples"


def draw_tokens(draw, n: int) -> list[int]:
    """`n` random token ids from one drawn seed (cheaper to draw and shrink than `n` integers)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [rng.randrange(VOCAB) for _ in range(n)]


# Block multiples and their neighbours are drawn often: full last blocks are where prefix caching is subtle.
AT_BLOCK_EDGES = st.sampled_from([BLOCK, 2 * BLOCK, 3 * BLOCK, 2 * BLOCK + 1])
PROMPT_LENGTHS = st.one_of(st.integers(1, MAX_PROMPT), AT_BLOCK_EDGES)


@st.composite
def request_mixes(draw):
    """Requests as (arrival round, prompt, max_tokens), plus the engine to run them on."""
    num_prefixes = draw(st.integers(1, 2))
    prefixes = [draw_tokens(draw, draw(st.integers(BLOCK, 3 * BLOCK))) for _ in range(num_prefixes)]
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["fresh", "shared", "copy"]))
        if kind == "copy" and requests:  # the exact prompt of an earlier request
            prompt = list(draw(st.sampled_from(requests))[1])
        elif kind == "shared":
            prefix = draw(st.sampled_from(prefixes))
            cut = draw(st.one_of(st.integers(1, len(prefix)), st.sampled_from([BLOCK, len(prefix)])))
            prompt = prefix[:cut] + draw_tokens(draw, draw(st.integers(0, MAX_PROMPT - cut)))
        else:
            prompt = draw_tokens(draw, draw(PROMPT_LENGTHS))
        requests.append((draw(st.integers(0, 2)), prompt, draw(st.integers(1, MAX_TOKENS))))
    return dict(
        requests=requests,
        gap=draw(st.integers(1, 4)),  # steps between arrival rounds
        engine=(draw(st.booleans()), draw(st.sampled_from(BUDGETS))),
    )


def run_mix(llm: LLM, mix: dict) -> dict[int, list[int]]:
    """Add each round's requests once `round * gap` steps have run (or the engine is idle), stepping
    in between; returns each request's completion, in request order."""
    requests = mix["requests"]
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    ids: dict[int, int] = {}
    outputs: dict[int, list[int]] = {}
    # Every step computes at least one token; preemption recomputes at most the whole sequence.
    limit = sum((len(p) + n) * (n + 1) for _, p, n in requests) + 10
    steps = 0
    while pending or not llm.is_finished():
        while pending and (requests[pending[0]][0] * mix["gap"] <= steps or llm.is_finished()):
            i = pending.pop(0)
            ids[i] = llm.add_request(requests[i][1], greedy(requests[i][2]))
        finished, _ = llm.step()
        llm.block_manager.check_integrity()
        for seq_id, token_ids in finished:
            assert seq_id not in outputs, f"request {seq_id} reported twice"
            outputs[seq_id] = token_ids
        steps += 1
        assert steps <= limit, "the engine made no progress"
    assert sorted(outputs) == sorted(ids.values())
    return {i: outputs[ids[i]] for i in range(len(requests))}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mix=request_mixes())
def test_random_request_mixes_match_an_unconstrained_engine(pool, reference, mix):
    reference.ensure([p for _, p, _ in mix["requests"]])
    llm = pool.get(mix["engine"])
    try:
        assert_idle(llm)  # as the previous example left it
        completions = run_mix(llm, mix)
        assert_idle(llm)
        for i, (_, prompt, max_tokens) in enumerate(mix["requests"]):
            assert completions[i] == reference(prompt, max_tokens), f"request {i}"
    except BaseException:
        pool.discard(mix["engine"])
        raise


# ---- property: several threads on one engine -----------------------------------------------------

THREAD_WAIT_S = 120.0  # a caller thread that has not finished by then failed (never a pass condition)


@st.composite
def thread_plans(draw):
    """Per thread, a list of calls: ("generate" | "stream" | "abort", prompts); "abort" streams and
    aborts its first request after `after` pieces."""
    plans = []
    for _ in range(draw(st.integers(2, 4))):
        calls = []
        for _ in range(draw(st.integers(1, 3))):
            prompts = [draw_tokens(draw, draw(PROMPT_LENGTHS)) for _ in range(draw(st.integers(1, 3)))]
            calls.append(
                (draw(st.sampled_from(["generate", "stream", "abort"])), prompts, draw(st.integers(0, 6)))
            )
        plans.append(calls)
    return dict(plans=plans, engine=(draw(st.booleans()), draw(st.sampled_from(BUDGETS))))


def run_plan(llm: LLM, calls: list) -> list[tuple[str, list[list[int]], list[tuple[str, list[int]]]]]:
    """Make one thread's calls; returns (kind, prompts, [(finish_reason, tokens) per prompt])."""
    done = []
    for kind, prompts, after in calls:
        if kind == "generate":
            outs = llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)
            done.append((kind, prompts, [(o["finish_reason"], o["token_ids"]) for o in outs]))
            continue
        tokens = {i: [] for i in range(len(prompts))}
        reasons = {}
        for n, item in enumerate(llm.stream(prompts, greedy(MAX_TOKENS))):
            tokens[item["index"]] += item["token_ids"]
            if item["finished"]:
                reasons[item["index"]] = item["finish_reason"]
            if kind == "abort" and n == after:
                llm.abort_request(item["request_id"])
        done.append((kind, prompts, [(reasons[i], tokens[i]) for i in range(len(prompts))]))
    return done


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mix=thread_plans())
def test_threads_mixing_generate_stream_and_abort_get_their_own_results(pool, reference, mix):
    reference.ensure([p for calls in mix["plans"] for _, prompts, _ in calls for p in prompts])
    llm = pool.get(mix["engine"])
    results, errors = [None] * len(mix["plans"]), []

    def worker(i):
        try:
            results[i] = run_plan(llm, mix["plans"][i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(mix["plans"]))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(THREAD_WAIT_S)
        assert not any(t.is_alive() for t in threads), "a caller thread hung"
        if errors:
            raise errors[0]
        for done in results:
            for kind, prompts, outs in done:
                for prompt, (reason, tokens) in zip(prompts, outs):
                    full = reference(prompt)
                    if reason == "abort":
                        assert kind == "abort" and tokens == full[: len(tokens)]
                    else:
                        assert (reason, tokens) == ("length", full)
        assert_idle(llm)
    except BaseException:
        pool.discard(mix["engine"])
        raise


# ---- interrupts ----------------------------------------------------------------------------------------


def interrupt_launch(monkeypatch, llm: LLM, at: int) -> list[int]:
    """Make the engine's `at`-th model launch from now raise KeyboardInterrupt; returns the call count."""
    calls = [0]
    launch = llm.model_runner.launch

    def failing_launch(batch):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return launch(batch)

    monkeypatch.setattr(llm.model_runner, "launch", failing_launch)
    return calls


PROMPTS = random_prompts(4, [20, 7, 45, 3], seed=11)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("at", [1, 2, 3, 5, 9])
def test_interrupted_generate_leaves_nothing_behind(qwen3_tied, monkeypatch, overlap, at):
    config = dict(overlap_scheduling=overlap, max_num_batched_tokens=32, num_kvcache_blocks=MIN_BLOCKS + 2)
    llm = make_llm(qwen3_tied, **config)
    calls = interrupt_launch(monkeypatch, llm, at)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    assert calls[0] == at
    assert_idle(llm)
    monkeypatch.undo()
    outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    assert_idle(llm)
    with make_llm(qwen3_tied, **config) as fresh:
        expected = fresh.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in expected]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_interrupted_generate_spares_other_requests(qwen3_tied, reference, monkeypatch, overlap, at):
    # A request added with add_request is running (its token possibly in flight) when a generate call
    # of other prompts is interrupted: it must carry on and complete correctly.
    llm = make_llm(qwen3_tied, overlap_scheduling=overlap, num_kvcache_blocks=MIN_BLOCKS + 2)
    other = llm.add_request(PROMPTS[0], greedy(MAX_TOKENS))
    finished, _ = llm.step()
    assert finished == []
    interrupt_launch(monkeypatch, llm, at)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[1:], greedy(MAX_TOKENS), use_tqdm=False)
    monkeypatch.undo()
    assert drain(llm) == {other: reference(PROMPTS[0])}
    assert_idle(llm)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("at", [1, 2, 3, 4, 7])
def test_interrupted_step_can_be_resumed(qwen3_tied, reference, monkeypatch, overlap, at):
    # With the lower-level API a caller may catch the interrupt and keep stepping: every request must
    # still complete exactly as without the interrupt. Launches 1-3 are prefills (the first and third
    # complete prompts, the second is a chunk), the later ones decode steps.
    llm = make_llm(qwen3_tied, overlap_scheduling=overlap, max_num_batched_tokens=32, num_kvcache_blocks=16)
    ids = [llm.add_request(p, greedy(MAX_TOKENS)) for p in PROMPTS]
    calls = interrupt_launch(monkeypatch, llm, at)
    outputs: dict[int, list[int]] = {}
    while not llm.is_finished():
        try:
            finished, _ = llm.step()
        except KeyboardInterrupt:
            llm.block_manager.check_integrity()
            continue
        llm.block_manager.check_integrity()
        outputs.update(finished)
        assert calls[0] < 200, "no progress"
    assert calls[0] > at
    assert outputs == {i: reference(p) for i, p in zip(ids, PROMPTS)}
    assert_idle(llm)


# ---- abort ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [True, False])
def test_abort_waiting_and_running_requests(qwen3_tied, reference, overlap):
    llm = make_llm(qwen3_tied, overlap_scheduling=overlap, num_kvcache_blocks=8, max_num_batched_tokens=16)
    bm = llm.block_manager
    keep, running, chunked, waiting = random_prompts(4, [10, 20, 40, 5], seed=5)
    keep_id = llm.add_request(keep, greedy(MAX_TOKENS))
    running_id = llm.add_request(running, greedy(MAX_TOKENS))
    llm.step()  # prefill of keep (10 tokens); running's 20 do not fit the budget of 16 as well
    llm.step()  # first chunk of running
    llm.step()  # rest of running
    chunked_id = llm.add_request(chunked, greedy(MAX_TOKENS))
    waiting_id = llm.add_request(waiting, greedy(MAX_TOKENS))
    llm.step()  # first 16 of chunked's 40 tokens: it waits for the rest, holding all 3 of its blocks
    free = bm.num_free_blocks

    llm.abort_request(waiting_id)  # never started: holds no block
    assert bm.num_free_blocks == free
    llm.abort_request(chunked_id)
    assert bm.num_free_blocks == free + 3
    bm.check_integrity()

    for _ in range(3):  # a few decode steps of keep and running
        finished, num_tokens = llm.step()
        assert finished == [] and num_tokens == -2
    free = bm.num_free_blocks
    llm.abort_request(running_id)  # 20 prompt tokens and a few sampled ones: 2 blocks
    assert bm.num_free_blocks == free + 2
    bm.check_integrity()

    assert drain(llm) == {keep_id: reference(keep)}
    assert_idle(llm)
    for seq_id in (running_id, keep_id, 10_000):  # aborted, finished, never issued
        with pytest.raises(ValueError, match=f"no unfinished request with id {seq_id}"):
            llm.abort_request(seq_id)
    out = llm.generate([running, chunked], greedy(MAX_TOKENS), use_tqdm=False)
    assert [o["token_ids"] for o in out] == [reference(running), reference(chunked)]
    assert_idle(llm)


# ---- exit and lifetime ---------------------------------------------------------------------------------


def assert_exited(llm: LLM) -> None:
    prompt = PROMPTS[1]
    calls = [
        lambda: llm.generate([prompt], greedy(2), use_tqdm=False),
        lambda: llm.add_request(prompt, greedy(2)),
        llm.step,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="exit"):
            call()


def test_exit_twice_context_manager_and_new_engines(qwen3_tied, reference):
    llm = make_llm(qwen3_tied)
    out = llm.generate([PROMPTS[0]], greedy(MAX_TOKENS), use_tqdm=False)
    assert out[0]["token_ids"] == reference(PROMPTS[0])
    llm.add_request(PROMPTS[1], greedy(MAX_TOKENS))
    llm.step()  # exit with a request running (and, with overlap, a step in flight)
    llm.exit()
    llm.exit()
    assert_exited(llm)

    with make_llm(qwen3_tied) as managed:
        out = managed.generate([PROMPTS[2]], greedy(MAX_TOKENS), use_tqdm=False)
    assert out[0]["token_ids"] == reference(PROMPTS[2])
    assert_exited(managed)

    with pytest.raises(KeyError):
        with make_llm(qwen3_tied) as failing:
            raise KeyError("an error inside the with block")
    assert_exited(failing)

    again = make_llm(qwen3_tied)  # a new engine after others exited, in the same process
    out = again.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    assert [o["token_ids"] for o in out] == [reference(p) for p in PROMPTS]
    again.exit()


def test_exit_releases_weights_and_kv_cache(qwen3_tied):
    llm = make_llm(qwen3_tied)
    llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False)
    kv_cache = weakref.ref(llm.model_runner.kv_cache)
    weight = weakref.ref(next(llm.model_runner.model.parameters()))
    llm.exit()
    gc.collect()
    assert kv_cache() is None and weight() is None


def test_dropped_engine_is_garbage_collected(qwen3_tied):
    # An engine the caller drops without exit() must not be kept alive (weights, KV cache) until the
    # interpreter exits.
    llm = make_llm(qwen3_tied)
    llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False)
    engine = weakref.ref(llm)
    kv_cache = weakref.ref(llm.model_runner.kv_cache)
    del llm
    gc.collect()
    assert engine() is None and kv_cache() is None


# ---- requests that can never fit -------------------------------------------------------------------------


def test_requests_that_can_never_fit_are_refused(qwen3_tied, reference):
    llm = make_llm(qwen3_tied, num_kvcache_blocks=3, max_model_len=64)
    fits, too_long_for_cache = random_prompts(2, [20, 40], seed=9)
    refusal = "40 prompt tokens and max_tokens=12 can need 4 KV blocks of 16 tokens, but the cache has only 3"
    with pytest.raises(ValueError, match=refusal):
        llm.add_request(too_long_for_cache, greedy(MAX_TOKENS))
    # The prompt fits, but prompt plus completion (capped at max_model_len=64) could not.
    with pytest.raises(ValueError, match="max_tokens=1000 can need 4 KV blocks"):
        llm.add_request(fits, greedy(1000))
    with pytest.raises(ValueError, match="65 tokens, more than max_model_len=64"):
        llm.add_request([1] * 65, greedy(1))
    with pytest.raises(ValueError, match="4 KV blocks"):  # one bad prompt: nothing queued
        llm.generate([fits, too_long_for_cache], greedy(MAX_TOKENS), use_tqdm=False)
    assert_idle(llm)
    out = llm.generate([fits, fits[:5]], greedy(MAX_TOKENS), use_tqdm=False)
    assert [o["token_ids"] for o in out] == [reference(fits), reference(fits[:5])]
    assert_idle(llm)

    # With one more block the same long request fits: it runs until max_model_len.
    roomy = make_llm(qwen3_tied, num_kvcache_blocks=4, max_model_len=64)
    out = roomy.generate([fits], greedy(1000), use_tqdm=False)[0]["token_ids"]
    assert len(out) == 64 - len(fits) and out[:MAX_TOKENS] == reference(fits)
    assert_idle(roomy)


# ---- two engines in one process --------------------------------------------------------------------------


def test_two_engines_interleaved(qwen3_tied, qwen3_untied, reference):
    prompts = random_prompts(5, [33, 4, 17, 60, 9], seed=21)
    with make_llm(qwen3_untied, num_kvcache_blocks=64) as solo:
        untied_ref = [o["token_ids"] for o in solo.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)]
    a = make_llm(qwen3_tied, overlap_scheduling=True, max_num_batched_tokens=37)
    b_config = dict(kvcache_block_size=32, num_kvcache_blocks=4, max_num_batched_tokens=16)
    b = make_llm(qwen3_untied, overlap_scheduling=False, **b_config)
    ids_a = [a.add_request(p, greedy(MAX_TOKENS)) for p in prompts]
    ids_b = [b.add_request(p, greedy(MAX_TOKENS)) for p in prompts]
    out_a: dict[int, list[int]] = {}
    out_b: dict[int, list[int]] = {}
    for _ in range(1000):
        if a.is_finished() and b.is_finished():
            break
        for llm, out in ((a, out_a), (b, out_b)):
            if not llm.is_finished():
                out.update(llm.step()[0])
                llm.block_manager.check_integrity()
    assert [out_a[i] for i in ids_a] == [reference(p) for p in prompts]
    assert [out_b[i] for i in ids_b] == untied_ref
    assert_idle(a)
    assert_idle(b)
    a.exit()
    b.exit()


@pytest.mark.parametrize("entry", ["generate", "stream"])
def test_a_request_vanishing_from_the_scheduler_raises_instead_of_hanging(qwen3_tied, entry, monkeypatch):
    """An internal invariant: if a request a caller waits for is lost by the scheduler (never run),
    both entry points raise instead of stepping forever, and the engine stays usable."""
    llm = make_llm(qwen3_tied, overlap_scheduling=False)  # no step in flight between steps
    with monkeypatch.context() as m:
        m.setattr(type(llm.scheduler), "add", lambda self, seq: None)  # the bug being simulated
        with pytest.raises(RuntimeError, match="vanished"):
            if entry == "generate":
                llm.generate([[1, 2, 3]], greedy(4), use_tqdm=False)
            else:
                list(llm.stream([[1, 2, 3]], greedy(4)))
    assert_idle(llm)
    assert len(llm.generate([[1, 2, 3]], greedy(4), use_tqdm=False)[0]["token_ids"]) == 4
    llm.exit()
