"""KV blocks of sliding-window models: released once wholly before every later query's window, prompts
given blocks chunk by chunk. Driven by a fake model that keeps a fake paged cache, writes every token a
step computes and reads back only what a windowed attention reads (the last W positions of each query),
failing if a slot there is not the sequence's own (a released block reused too early, a wrong hit)."""

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import FREED_BLOCK, BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

VOCAB = 16


def next_token(window_history: list[tuple[int, int]]) -> int:
    """The fake model: a function of the (position, token) pairs its window sees."""
    return xxhash.xxh64(np.asarray(window_history, dtype=np.int64).tobytes()).intdigest() % VOCAB


def reference(prompt: list[int], max_tokens: int, window: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        start = max(0, len(tokens) - window)
        tokens.append(next_token([(p, tokens[p]) for p in range(start, len(tokens))]))
    return tokens[len(prompt) :]


class WindowedFakeModel:
    def __init__(self, block_size: int, window: int):
        self.bs, self.window = block_size, window
        self.cache: dict[int, list] = {}

    def _slot(self, seq: Sequence, pos: int):
        block = seq.block_table[pos // self.bs]
        assert block != FREED_BLOCK, f"{seq}: position {pos} is inside a window but its block was released"
        return self.cache.setdefault(block, [None] * self.bs), pos % self.bs

    def run(self, batch) -> list[int]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                page, off = self._slot(seq, pos)
                page[off] = (pos, seq.token_ids[pos])
        out = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            for q in range(start, end):  # every query reads its window
                seen = [self._slot(seq, p) for p in range(max(0, q - self.window + 1), q + 1)]
                got = [page[off] for page, off in seen]
                want = [(p, seq.token_ids[p]) for p in range(max(0, q - self.window + 1), q + 1)]
                assert got == want, f"{seq}: the window of query {q} does not hold this sequence's tokens"
            out.append(next_token(got) if end == seq.num_tokens else -7)
        return out


def make(num_blocks, block_size=4, window=8, budget=16, max_num_seqs=4, caching=True):
    bm = BlockManager(num_blocks, block_size, caching, sliding_window=window)
    return Scheduler(max_num_seqs, budget, None, bm, 10_000), WindowedFakeModel(block_size, window)


def run(sched, model, max_steps=5000) -> list[int]:
    held = []
    for _ in range(max_steps):
        if sched.is_finished():
            break
        batch = sched.schedule()
        sched.block_manager.check_integrity()
        sched.postprocess(batch, model.run(batch))
        sched.block_manager.check_integrity()
        held.append(sched.block_manager.num_blocks - sched.block_manager.num_free_blocks)
    assert sched.is_finished()
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    return held


def seq(i, prompt, max_tokens, block_size=4):
    return Sequence(i, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), block_size)


def test_release_exact_blocks_and_keep_the_two_newest():
    bm = BlockManager(16, 4, sliding_window=6)
    s = seq(0, list(range(20)), 1)  # 5 blocks
    bm.allocate(s)
    table = list(s.block_table)
    s.num_computed_tokens = 20  # next query at 20 sees keys 15..20: blocks 0..2 (positions < 12) are dead
    assert bm.free_outside_window(s) == 3
    assert s.block_table == [FREED_BLOCK] * 3 + table[3:]
    assert [bm.blocks[b].ref_count for b in table] == [0, 0, 0, 1, 1]
    assert all(bm.blocks[b].hash is not None for b in table[:3])  # released, still cached
    assert bm.free_outside_window(s) == 0  # idempotent
    bm.check_integrity()
    # a full window's blocks are never released even when the window is smaller than a block
    small = BlockManager(16, 4, sliding_window=1)
    t = seq(1, list(range(9)), 1)
    small.allocate(t)
    t.num_computed_tokens = 9
    assert small.free_outside_window(t) == 1 and t.block_table[0] == FREED_BLOCK  # keeps blocks 1, 2
    small.deallocate(t)
    assert small.num_free_blocks == 16
    small.check_integrity()


def test_no_window_releases_nothing():
    bm = BlockManager(16, 4)
    s = seq(0, list(range(20)), 1)
    bm.allocate(s)
    s.num_computed_tokens = 20
    assert bm.free_outside_window(s) == 0 and FREED_BLOCK not in s.block_table
    assert bm.most_blocks_held(1000, 64) == 250


def test_memory_stops_growing_with_length():
    """Blocks held vs length: without a window they grow with the sequence, with one they stop."""
    window, bs = 8, 4
    results = {}
    for length in (100, 400, 1600):
        sched, model = make(64, bs, window, budget=16)
        s = seq(0, [1, 2, 3, 4, 5], length)
        sched.add(s)
        held = run(sched, model)
        assert s.completion_token_ids == reference([1, 2, 3, 4, 5], length, window)
        results[length] = max(held)
    assert results[100] == results[400] == results[1600] <= window // bs + 3
    # the same sequence without a window needs one block per 4 tokens: 1605 tokens would need 402
    assert BlockManager(64, bs).most_blocks_held(1605, 16) == 402


def test_prompt_longer_than_the_cache_runs_chunk_by_chunk():
    sched, model = make(8, 4, 8, budget=8)  # 32 token slots
    prompt = [(7 * i) % VOCAB for i in range(200)]
    s = seq(0, prompt, 20)
    sched.add(s)
    held = run(sched, model)
    assert s.completion_token_ids == reference(prompt, 20, 8)
    assert max(held) <= sched.block_manager.most_blocks_held(220, 8) <= 8


def test_prefix_hit_revives_released_blocks():
    sched, model = make(64, 4, 8, budget=64)
    prompt = [(3 * i + 1) % VOCAB for i in range(40)]
    a = seq(0, prompt, 4)
    sched.add(a)
    run(sched, model)
    b = seq(1, prompt[:36] + [5, 5, 5], 4)
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_tokens == 36  # nine blocks found, some released by `a` earlier
    sched.postprocess(batch, model.run(batch))
    assert b.block_table[0] == FREED_BLOCK  # the hits before the window are released again
    run(sched, model)
    assert b.completion_token_ids == reference(b.prompt_token_ids, 4, 8)


def test_started_prompt_goes_before_a_preempted_one():
    """A preempted sequence at the front must not block a half-prefilled one that holds blocks."""
    sched, model = make(9, 4, 8, budget=8, max_num_seqs=2)
    a = seq(0, [1] * 6, 40)
    b = seq(1, [(5 * i) % VOCAB for i in range(60)], 5)
    sched.add(a)
    sched.add(b)
    run(sched, model)
    assert a.completion_token_ids == reference([1] * 6, 40, 8)
    assert b.completion_token_ids == reference(b.prompt_token_ids, 5, 8)


@st.composite
def workloads(draw):
    bs = draw(st.sampled_from([2, 4]))
    window = draw(st.integers(1, 12))
    budget = draw(st.integers(1, 24))
    reqs = []
    base = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30))
    for _ in range(draw(st.integers(1, 5))):
        shared = draw(st.integers(0, len(base)))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20))
        reqs.append((base[:shared] + tail, draw(st.integers(1, 30))))
    # enough blocks for the largest sequence's window and chunk, sometimes not for all at once
    need = (window + budget) // bs + 4
    num_blocks = draw(st.integers(need, need + 12))
    return bs, window, budget, reqs, num_blocks, draw(st.booleans()), draw(st.integers(1, 4))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(workloads())
def test_any_windowed_schedule_gives_the_reference_completions(w):
    bs, window, budget, reqs, num_blocks, caching, max_num_seqs = w
    sched, model = make(num_blocks, bs, window, budget, max_num_seqs, caching)
    seqs = [seq(i, p, n, bs) for i, (p, n) in enumerate(reqs)]
    for s in seqs:
        sched.add(s)
    held = run(sched, model)
    for s, (p, n) in zip(seqs, reqs):
        assert s.completion_token_ids == reference(p, n, window)
    assert max(held) <= num_blocks


def test_block_manager_rejects_a_bad_window():
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        BlockManager(4, 4, sliding_window=0)
