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
        for src, dst in batch.block_copies:  # a fork's own copy of its parent's partly filled block
            self.cache[dst] = list(self.cache[src])
        return out + [out[parent] for parent, _ in batch.forks]  # a fork samples its parent's logits


def make(num_blocks, block_size=4, window=8, budget=16, max_num_seqs=4, caching=True):
    bm = BlockManager(num_blocks, block_size, caching, sliding_window=window)
    return Scheduler(max_num_seqs, budget, None, bm, 10_000), WindowedFakeModel(block_size, window)


def run(sched, model, max_steps=5000, seqs=()) -> list[int]:
    for s in seqs:
        sched.add(s)
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


def test_a_cached_prefix_longer_than_the_cache_takes_only_its_window():
    """A prompt whose cached prefix alone is more blocks than the cache: the hits before the first
    query's window are neither referenced nor revived (their entries are FREED_BLOCK), so it runs in a
    cache sized for one window and chunk, and the blocks after the hits still chain to them."""
    bs, window = 16, 32
    sched, model = make(8, bs, window, budget=32)
    prompt = [(5 * i + 3) % VOCAB for i in range(112)]
    run(sched, model, seqs=[seq(0, prompt, 4, bs)])
    longer = prompt + [(7 * i + 1) % VOCAB for i in range(100)]
    bm = sched.block_manager
    b = seq(1, longer, 4, bs)
    hits = bm.prefix_hits(b)
    assert len(hits) == 7  # all seven full blocks of the first prompt are still cached (free)
    # the first query (position 112) sees keys 81..112: hits 0-4 are never read, 5 and 6 are taken,
    # and the first chunk (112..143) needs two fresh blocks; taking every hit would need 9 of 8
    assert bm.num_blocks_to_allocate(b, hits, 112 + 32) == 4
    sched.add(b)
    batch = sched.schedule()
    assert b.num_cached_tokens == 112 and b.block_table[:7] == [FREED_BLOCK] * 5 + hits[5:]
    held = [x for x in b.block_table if x != FREED_BLOCK]
    assert len(held) == 4 and bm.num_free_blocks == 4 and [bm.blocks[h].ref_count for h in hits[5:]] == [1, 1]
    # the skipped hits stayed free: two were handed out (oldest first) for the chunk's new tokens,
    # the others keep their hash for a later prompt
    assert set(held[2:]) == set(hits[:2]) and set(hits[2:5]) <= set(bm.free_block_ids)
    assert all(bm.blocks[h].hash is not None for h in hits[2:5])
    bm.check_integrity()
    sched.postprocess(batch, model.run(batch))
    run(sched, model)
    assert b.completion_token_ids == reference(longer, 4, window)
    # the blocks computed after the hits were hashed on the chain through them: every hash the cache
    # holds is that of a block of `longer` (whose first seven are the first prompt), some past the hits
    chain, h = [], None
    for i in range(len(longer) // bs):
        h = bm.compute_hash(longer[i * bs : (i + 1) * bs], h)
        chain.append(h)
    assert set(bm.hash_to_block_id) <= set(chain) and set(bm.hash_to_block_id) & set(chain[7:])


def test_a_prompt_waiting_for_blocks_runs_once_the_last_running_sequence_preempts_itself():
    """A half-prefilled prompt waits for its next chunk's blocks while the only running sequence cannot
    get the block its decode step needs and preempts itself: the blocks it frees must go to a prefill
    in the same call (nothing is in flight to free more later), not end the schedule."""
    bs, window = 16, 16
    sched, model = make(4, bs, window, budget=16, max_num_seqs=2, caching=False)
    lengths, max_tokens = (108, 16, 120), (100, 4, 88)
    prompts = [[(3 * i + j) % VOCAB for i in range(n)] for j, n in enumerate(lengths)]
    seqs = [seq(i, p, m, bs) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    seqs[1].num_pending_forks = 2  # n=3: two forks share its prompt
    preempted = []
    preempt = sched.preempt
    sched.preempt = lambda s: (preempted.append(s.seq_id), preempt(s))[1]
    run(sched, model, seqs=seqs)
    assert preempted
    for s, p, m in zip(seqs, prompts, max_tokens):
        assert s.completion_token_ids == reference(p, m, window)


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
        reqs.append((base[:shared] + tail, draw(st.integers(1, 30)), draw(st.integers(1, 3))))  # n
    # the least cache LLMEngine admits these requests into (its `_check_params` bound), sometimes more
    bound = BlockManager(1, bs, sliding_window=window)
    need = max(
        max(bound.most_blocks_held(len(p) + m, budget), bound.most_blocks_held(len(p), budget) + (n - 1))
        for p, m, n in reqs
    )
    num_blocks = draw(st.integers(need, need + 8))
    return bs, window, budget, reqs, num_blocks, draw(st.booleans()), draw(st.integers(1, 4))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(workloads())
def test_any_windowed_schedule_gives_the_reference_completions(w):
    """Steps recorded one at a time, as with overlap scheduling off (`schedule` raises if nothing can
    run: no step in flight could free blocks). Requests with n completions fork at their prompt's end."""
    bs, window, budget, reqs, num_blocks, caching, max_num_seqs = w
    sched, model = make(num_blocks, bs, window, budget, max_num_seqs, caching)
    seqs = [seq(i, p, m, bs) for i, (p, m, _) in enumerate(reqs)]
    for s, (_, _, n) in zip(seqs, reqs):
        s.num_pending_forks = n - 1
    forks: list[Sequence] = []
    fork = sched._fork

    def record_forks(parent, copies):
        children = fork(parent, copies)
        forks.extend(children)
        return children

    sched._fork = record_forks
    held = run(sched, model, seqs=seqs)
    for s, (p, m, _) in zip(seqs, reqs):
        assert s.completion_token_ids == reference(p, m, window)
    for child in forks:
        assert child.completion_token_ids == reference(child.prompt_token_ids, child.max_tokens, window)
    assert len(forks) == sum(n - 1 for _, _, n in reqs)
    assert max(held) <= num_blocks


def test_block_manager_rejects_a_bad_window():
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        BlockManager(4, 4, sliding_window=0)
