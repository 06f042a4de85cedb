"""Scheduler on the CPU, driven by a fake model that keeps a fake paged KV cache.

The fake model writes (position, token) into the cache slots of every token a step computes, then
reads each scheduled sequence's whole context back through its block table, exactly as attention
would, and fails if anything there is not that sequence's own history (a wrong prefix hit, a reused
block, a block never computed). Its next token is a deterministic function of the full history, so
the completions of any schedule must equal those of a plain loop without a scheduler.
"""

import math

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

VOCAB = 32
EOS = 0
CHUNK_TOKEN = 12_345  # what the fake model returns for a prefill chunk: must be ignored


def next_token(history: list[int]) -> int:
    """The fake model: a deterministic function of the whole token history."""
    return xxhash.xxh64(np.asarray(history, dtype=np.int64).tobytes()).intdigest() % VOCAB


def reference_completion(
    prompt: list[int], sp: SamplingParams, eos: int | None, max_model_len: int
) -> list[int]:
    """What generation must produce, computed without any scheduling."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if not sp.ignore_eos and eos is not None and t == eos:
            return out
        if len(out) >= sp.max_tokens or len(tokens) >= max_model_len:
            return out


class FakeModel:
    """Writes computed tokens into a fake paged cache and samples from what it reads back."""

    def __init__(self, block_manager: BlockManager):
        self.bs = block_manager.block_size
        self.cache: dict[int, list[tuple[int, int] | None]] = {}

    def _slot(self, seq: Sequence, pos: int) -> tuple[list, int]:
        block = seq.block_table[pos // self.bs]
        return self.cache.setdefault(block, [None] * self.bs), pos % self.bs

    def run(self, batch: ScheduledBatch) -> list[int]:
        assert batch.seqs and len(batch.seqs) == len(batch.num_new_tokens)
        # Store the K/V of every new token of the batch first (as each layer does), then attend.
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            assert n >= 1 and end <= seq.num_tokens <= len(seq.block_table) * self.bs, seq
            if not batch.is_prefill:
                assert n == 1 and start == seq.num_tokens - 1, seq
            for pos in range(start, end):
                page, off = self._slot(seq, pos)
                page[off] = (pos, seq.token_ids[pos])
        out = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            end = seq.num_computed_tokens + n
            seen = []
            for pos in range(end):
                page, off = self._slot(seq, pos)
                seen.append(page[off])
            expected = [(pos, seq.token_ids[pos]) for pos in range(end)]
            assert seen == expected, f"{seq}: the cache does not hold this sequence's tokens"
            if end == seq.num_tokens:
                out.append(next_token([t for _, t in seen]))
            else:
                out.append(CHUNK_TOKEN)
        return out


def make_seq(
    seq_id: int, prompt: list[int], block_size: int, max_tokens: int = 8, ignore_eos: bool = False
) -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), block_size)


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 64,
    eos: int | None = EOS,
    max_model_len: int = 1024,
) -> Scheduler:
    return Scheduler(max_num_seqs, budget, eos, BlockManager(num_blocks, block_size), max_model_len)


def assert_block_hashes_fresh(seq: Sequence) -> None:
    """The prefix-cache hashes memoised on `seq` are those of its current leading full blocks (the
    documented chain, hashed here without BlockManager.compute_hash, which tests may count)."""
    h = None
    for i, memo in enumerate(seq.block_hashes):
        block = seq.block(i)
        assert len(block) == seq.block_size and PLACEHOLDER_TOKEN not in block, (seq, i)
        x = xxhash.xxh64()
        if h is not None:
            x.update(h.to_bytes(8, "little"))
        x.update(np.asarray(block, dtype=np.int64).tobytes())
        h = x.intdigest()
        assert memo == h, (seq, i)


def step(sched: Scheduler, model: FakeModel) -> tuple[ScheduledBatch, list[Sequence]]:
    batch = sched.schedule()
    sched.block_manager.check_integrity()
    finished = sched.postprocess(batch, model.run(batch))
    sched.block_manager.check_integrity()
    for seq in [*batch.rows, *sched.waiting, *sched.running]:
        assert_block_hashes_fresh(seq)
    return batch, finished


def run_to_end(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> list[ScheduledBatch]:
    batches = []
    while not sched.is_finished():
        assert len(batches) < max_steps, "the scheduler did not finish in time"
        batches.append(step(sched, model)[0])
    assert_all_free(sched.block_manager)
    return batches


def assert_all_free(bm: BlockManager) -> None:
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def prompt_of(start: int, n: int) -> list[int]:
    return [(start + i) % VOCAB for i in range(n)]


def ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


# ---- prefill first -----------------------------------------------------------------------------


def test_prefill_in_arrival_order_up_to_max_num_seqs():
    sched = make_scheduler(64, max_num_seqs=2, budget=100)
    model = FakeModel(sched.block_manager)
    seqs = [make_seq(i, prompt_of(i * 3 + 1, 5 + i), 4, max_tokens=3, ignore_eos=True) for i in range(3)]
    for s in seqs:
        sched.add(s)

    batch, finished = step(sched, model)
    assert batch.phase == "prefill" and batch.is_prefill
    assert ids(batch.seqs) == [0, 1] and batch.num_new_tokens == [5, 6] and batch.num_tokens == 11
    assert finished == []
    assert [s.status.name for s in seqs] == ["RUNNING", "RUNNING", "WAITING"]
    assert [s.num_completion_tokens for s in seqs] == [1, 1, 0]
    assert seqs[2].block_table == []  # not admitted: holds no blocks

    batch, _ = step(sched, model)  # the waiting one still goes before any decode
    assert batch.phase == "prefill" and ids(batch.seqs) == [2] and batch.num_new_tokens == [7]

    batch, _ = step(sched, model)
    assert batch.phase == "decode" and not batch.is_prefill
    assert ids(batch.seqs) == [0, 1] and batch.num_new_tokens == [1, 1] and batch.num_tokens == 2
    assert list(sched.running) == seqs  # order of admission is kept

    run_to_end(sched, model)
    for s in seqs:
        assert s.completion_token_ids == reference_completion(
            s.prompt_token_ids, SamplingParams(max_tokens=3, ignore_eos=True), EOS, 1024
        )
        assert s.is_finished


def test_token_budget_stops_prefill_and_second_sequence_is_not_chunked():
    sched = make_scheduler(64, budget=10)
    model = FakeModel(sched.block_manager)
    a, b, c = (make_seq(i, prompt_of(10 * i + 1, 4), 4, max_tokens=2, ignore_eos=True) for i in range(3))
    for s in (a, b, c):
        sched.add(s)
    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [0, 1] and batch.num_new_tokens == [4, 4]
    assert c.block_table == [] and c.status == SequenceStatus.WAITING and c.num_computed_tokens == 0
    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [2] and batch.num_new_tokens == [4]
    batch, finished = step(sched, model)
    assert batch.phase == "decode" and ids(batch.seqs) == [0, 1, 2]
    assert ids(finished) == [0, 1, 2]
    assert sched.is_finished()
    assert_all_free(sched.block_manager)


def test_new_arrival_interrupts_decoding_with_a_prefill_step():
    sched = make_scheduler(64)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(1, 6), 4, max_tokens=6, ignore_eos=True)
    sched.add(a)
    assert step(sched, model)[0].phase == "prefill"
    assert step(sched, model)[0].phase == "decode"
    b = make_seq(1, prompt_of(9, 3), 4, max_tokens=6, ignore_eos=True)
    sched.add(b)
    computed_before = a.num_computed_tokens
    batch, _ = step(sched, model)
    assert batch.phase == "prefill" and ids(batch.seqs) == [1]
    assert a.num_computed_tokens == computed_before  # a did not advance in the prefill step
    batch, _ = step(sched, model)
    assert batch.phase == "decode" and ids(batch.seqs) == [0, 1]
    run_to_end(sched, model)
    assert a.num_completion_tokens == 6 and b.num_completion_tokens == 6


def test_waiting_sequence_that_cannot_get_blocks_lets_running_ones_decode():
    sched = make_scheduler(4)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(1, 9), 4, max_tokens=3, ignore_eos=True)  # 3 blocks
    sched.add(a)
    step(sched, model)
    b = make_seq(1, prompt_of(5, 8), 4, max_tokens=1)  # 2 blocks, only 1 free
    c = make_seq(2, prompt_of(17, 2), 4, max_tokens=1)  # would fit, but does not overtake b
    sched.add(b)
    sched.add(c)
    batch, _ = step(sched, model)
    assert batch.phase == "decode" and ids(batch.seqs) == [0]
    assert b.block_table == [] and c.block_table == [] and list(sched.waiting) == [b, c]
    run_to_end(sched, model)
    assert a.completion_token_ids == reference_completion(
        a.prompt_token_ids, SamplingParams(max_tokens=3, ignore_eos=True), EOS, 1024
    )
    assert b.num_completion_tokens == 1


def test_decode_batch_limited_by_max_num_seqs():
    sched = make_scheduler(64, max_num_seqs=2)
    model = FakeModel(sched.block_manager)
    seqs = [make_seq(i, prompt_of(i, 3), 4, max_tokens=4, ignore_eos=True) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for batch in run_to_end(sched, model):
        assert len(batch.seqs) <= 2
        if not batch.is_prefill:
            assert batch.num_new_tokens == [1] * len(batch.seqs)
    assert [s.num_completion_tokens for s in seqs] == [4, 4, 4]


# ---- chunked prefill -----------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end():
    sched = make_scheduler(32, budget=8)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(3, 20), 4, max_tokens=3, ignore_eos=True)
    b = make_seq(1, prompt_of(7, 3), 4, max_tokens=3, ignore_eos=True)
    sched.add(a)
    sched.add(b)

    batch, finished = step(sched, model)
    assert ids(batch.seqs) == [0] and batch.num_new_tokens == [8]
    assert a.block_table == [0, 1, 2, 3, 4]  # blocks for the whole prompt up front
    assert a.num_computed_tokens == 8 and a.num_tokens == 20  # the chunk's token was dropped
    assert a.status == SequenceStatus.WAITING and list(sched.waiting) == [a, b] and not sched.running
    assert finished == [] and b.block_table == []

    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [0] and batch.num_new_tokens == [8]
    assert a.num_computed_tokens == 16 and a.num_completion_tokens == 0

    batch, _ = step(sched, model)  # the rest of a (4) and all of b (3) fit in the budget
    assert batch.phase == "prefill" and ids(batch.seqs) == [0, 1] and batch.num_new_tokens == [4, 3]
    assert a.num_computed_tokens == 20 and a.num_completion_tokens == 1
    assert a.status == SequenceStatus.RUNNING and list(sched.running) == [a, b]
    assert a.completion_token_ids == [next_token(a.prompt_token_ids)]

    run_to_end(sched, model)
    ref = SamplingParams(max_tokens=3, ignore_eos=True)
    assert a.completion_token_ids == reference_completion(a.prompt_token_ids, ref, EOS, 1024)
    assert b.completion_token_ids == reference_completion(b.prompt_token_ids, ref, EOS, 1024)


def test_only_the_first_sequence_of_a_batch_is_chunked():
    sched = make_scheduler(32, budget=8)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(1, 5), 4, max_tokens=1)
    b = make_seq(1, prompt_of(2, 6), 4, max_tokens=1)  # 6 > the 3 tokens left: waits whole
    sched.add(a)
    sched.add(b)
    batch, finished = step(sched, model)
    assert ids(batch.seqs) == [0] and batch.num_new_tokens == [5]
    assert ids(finished) == [0]
    assert b.block_table == [] and b.num_computed_tokens == 0
    batch, finished = step(sched, model)
    assert ids(batch.seqs) == [1] and batch.num_new_tokens == [6]
    assert ids(finished) == [1]
    assert_all_free(sched.block_manager)


def test_postprocess_of_a_chunk_accepts_none_and_appends_nothing():
    sched = make_scheduler(32, budget=4)
    a = make_seq(0, prompt_of(1, 10), 4, max_tokens=2, ignore_eos=True)
    sched.add(a)
    batch = sched.schedule()
    assert batch.num_new_tokens == [4]
    assert sched.postprocess(batch, [None]) == []
    assert a.num_tokens == 10 and a.num_computed_tokens == 4
    batch = sched.schedule()
    assert sched.postprocess(batch, [7]) == []  # a chunk's token is ignored
    assert a.token_ids == prompt_of(1, 10) and a.num_computed_tokens == 8
    batch = sched.schedule()
    assert batch.num_new_tokens == [2]
    sched.postprocess(batch, [7])
    assert a.completion_token_ids == [7] and a.num_computed_tokens == 10
    sched.block_manager.check_integrity()
    sched.abort(a)
    assert_all_free(sched.block_manager)


def test_chunked_prefill_with_budget_one():
    sched = make_scheduler(16, budget=1)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(4, 6), 4, max_tokens=2, ignore_eos=True)
    sched.add(a)
    batches = run_to_end(sched, model)
    assert [(b.phase, b.num_new_tokens) for b in batches] == [("prefill", [1])] * 6 + [("decode", [1])]
    assert a.completion_token_ids == reference_completion(
        a.prompt_token_ids, SamplingParams(max_tokens=2, ignore_eos=True), EOS, 1024
    )


# ---- preemption ------------------------------------------------------------------------------------


def test_preemption_takes_the_most_recently_admitted_sequence():
    sched = make_scheduler(5, max_num_seqs=8)
    bm = sched.block_manager
    model = FakeModel(bm)
    seqs = [make_seq(i, prompt_of(5 * i + 1, 4), 4, max_tokens=6, ignore_eos=True) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [0, 1, 2, 3] and [s.block_table for s in seqs] == [[0], [1], [2], [3]]
    # Each now holds 5 tokens and needs a second block; one block is free.
    late = make_seq(4, prompt_of(20, 5), 4, max_tokens=1)  # needs 2 blocks: cannot start now
    sched.add(late)
    s0, s1, s2, s3 = seqs
    tokens_before = [list(s.token_ids) for s in seqs]
    batch = sched.schedule()
    bm.check_integrity()
    # s0 takes the free block; s1 preempts s3 (the newest) and takes its block; s2 then finds nothing
    # left to preempt but itself.
    assert batch.phase == "decode" and ids(batch.seqs) == [0, 1]
    assert s0.block_table == [0, 4] and s1.block_table == [1, 3]
    for s in (s2, s3):
        assert s.status == SequenceStatus.WAITING and s.block_table == [] and s.num_computed_tokens == 0
    assert list(sched.waiting) == [s2, s3, late] and list(sched.running) == [s0, s1]
    assert list(bm.free_block_ids) == [2]
    sched.postprocess(batch, model.run(batch))
    bm.check_integrity()
    assert [s.token_ids for s in (s2, s3)] == tokens_before[2:]  # nothing generated while preempted

    recomputes: dict[int, tuple[int, int]] = {}
    while not sched.is_finished():
        batch = sched.schedule()
        bm.check_integrity()
        if batch.is_prefill:
            for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                if s in (s2, s3) and s.seq_id not in recomputes:
                    recomputes[s.seq_id] = (s.num_computed_tokens, s.num_computed_tokens + n)
        sched.postprocess(batch, model.run(batch))
        bm.check_integrity()
    assert_all_free(bm)
    # Each is recomputed from scratch: prompt + the one token generated before preemption (their freed
    # prompt blocks were reused by s1 and then s0 before they came back).
    assert recomputes == {2: (0, 5), 3: (0, 5)}

    big = make_scheduler(64, max_num_seqs=8)
    big_seqs = [
        make_seq(i, s.prompt_token_ids, 4, max_tokens=s.max_tokens, ignore_eos=s.ignore_eos)
        for i, s in enumerate(seqs + [late])
    ]
    for s in big_seqs:
        big.add(s)
    batches = run_to_end(big, FakeModel(big.block_manager))
    assert len(batches) == 1 + 5  # one prefill of all five, then 5 decodes: no preemption
    assert [s.completion_token_ids for s in seqs + [late]] == [s.completion_token_ids for s in big_seqs]
    assert [s.num_completion_tokens for s in seqs] == [6, 6, 6, 6]


def test_last_running_sequence_preempts_itself():
    sched = make_scheduler(3)
    bm = sched.block_manager
    model = FakeModel(bm)
    a = make_seq(0, prompt_of(1, 4), 4, max_tokens=8, ignore_eos=True)
    b = make_seq(1, prompt_of(2, 4), 4, max_tokens=8, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    step(sched, model)
    batch = sched.schedule()
    bm.check_integrity()
    assert ids(batch.seqs) == [0]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and list(sched.waiting) == [b]
    assert a.block_table == [0, 2]
    sched.postprocess(batch, model.run(batch))
    run_to_end(sched, model)
    for s in (a, b):
        assert s.completion_token_ids == reference_completion(
            s.prompt_token_ids, SamplingParams(max_tokens=8, ignore_eos=True), EOS, 1024
        )


def test_preemption_with_shared_prefix_blocks():
    # Two sequences share a cached first block; preempting one must not free the shared block.
    sched = make_scheduler(5)
    bm = sched.block_manager
    model = FakeModel(bm)
    shared = prompt_of(3, 4)
    a = make_seq(0, shared + [9, 9, 9], 4, max_tokens=9, ignore_eos=True)
    b = make_seq(1, shared + [8, 8, 8], 4, max_tokens=9, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched, model)
    assert batch.num_new_tokens == [7, 3]  # b's hit is on a block computed in the same step
    assert b.block_table[0] == a.block_table[0] and bm.blocks[a.block_table[0]].ref_count == 2
    assert b.num_cached_tokens == 4
    preempted = False
    while not sched.is_finished():
        step(sched, model)
        preempted |= b.status == SequenceStatus.WAITING
        if a.block_table and b.block_table:
            assert bm.blocks[a.block_table[0]].ref_count == 2
    assert preempted
    assert_all_free(bm)
    ref = SamplingParams(max_tokens=9, ignore_eos=True)
    assert a.completion_token_ids == reference_completion(a.prompt_token_ids, ref, EOS, 1024)
    assert b.completion_token_ids == reference_completion(b.prompt_token_ids, ref, EOS, 1024)


def test_waiting_prompt_is_hashed_once_however_many_passes_it_waits(monkeypatch):
    # b shares a's first 7 blocks (prefix hits) but needs 13 fresh blocks, and only a's finishing
    # frees that many: b waits through all of a's decode steps, and each pass looks its prompt up.
    bs = 4
    b_blocks: set[tuple[int, ...]] = set()
    b_hashes = []

    def counting_hash(token_ids, prefix_hash=None):
        if tuple(token_ids) in b_blocks:
            b_hashes.append(tuple(token_ids))
        return original(token_ids, prefix_hash)

    original = BlockManager.compute_hash
    monkeypatch.setattr(BlockManager, "compute_hash", staticmethod(counting_hash))
    sched = make_scheduler(20, bs, budget=64)
    bm = sched.block_manager
    model = FakeModel(bm)
    a_prompt = prompt_of(1, 32)  # 8 blocks, up to 10 with its completion
    a = make_seq(0, a_prompt, bs, max_tokens=8, ignore_eos=True)
    sched.add(a)
    step(sched, model)
    # 20 blocks; the suffix uses ids the fake model never samples, so only b's lookups hash them.
    b_prompt = a_prompt[:28] + [100 + i for i in range(52)]
    b = make_seq(1, b_prompt, bs, max_tokens=1, ignore_eos=True)  # fills the cache: no decode
    b_blocks.update(tuple(b.block(i)) for i in range(b.num_blocks))
    sched.add(b)
    counts = []
    while not a.is_finished:
        batch, _ = step(sched, model)
        assert batch.phase == "decode" and batch.seqs == [a] and b.block_table == []
        counts.append(len(b_hashes))
    assert len(counts) == 7
    # The first pass hashes the 7 hits and the first miss; later passes hash nothing of b's.
    assert counts == [8] * 7
    assert b.block_hashes[:7] == [bm.blocks[i].hash for i in range(7)]
    batch, _ = step(sched, model)
    # Its 7 memoised hits were taken: only the 52 other tokens are computed.
    assert batch.phase == "prefill" and batch.seqs == [b] and batch.num_new_tokens == [52]
    # Admission hashes (to register them) only the full blocks that no pass hashed: each block once.
    assert len(b_hashes) == len(set(b_hashes)) == len(b_prompt) // bs
    assert b.is_finished
    assert_all_free(bm)
    ref = SamplingParams(max_tokens=1, ignore_eos=True)
    assert b.completion_token_ids == reference_completion(b_prompt, ref, EOS, 1024)


def test_request_too_big_for_the_whole_cache_is_a_runtime_error():
    sched = make_scheduler(2)
    a = make_seq(0, prompt_of(1, 12), 4, max_tokens=1)  # 3 blocks, the cache has 2
    sched.add(a)
    with pytest.raises(RuntimeError):
        sched.schedule()
    sched.block_manager.check_integrity()
    assert list(sched.waiting) == [a] and a.block_table == []
    assert_all_free(sched.block_manager)


# ---- stopping ----------------------------------------------------------------------------------------


def test_eos_stops_unless_ignore_eos():
    sched = make_scheduler(16, eos=5)
    a = make_seq(0, [1, 2, 3], 4, max_tokens=10)
    b = make_seq(1, [1, 2, 3], 4, max_tokens=10, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert sched.postprocess(batch, [6, 6]) == []
    batch = sched.schedule()
    assert batch.phase == "decode"
    finished = sched.postprocess(batch, [5, 5])
    assert finished == [a]
    assert a.completion_token_ids == [6, 5] and a.status == SequenceStatus.FINISHED and a.block_table == []
    assert b.completion_token_ids == [6, 5] and b.status == SequenceStatus.RUNNING
    assert list(sched.running) == [b]
    sched.block_manager.check_integrity()
    sched.abort(b)
    assert_all_free(sched.block_manager)


def test_no_eos_token_never_stops_on_a_token():
    sched = make_scheduler(16, eos=None)
    a = make_seq(0, [1, 2, 3], 4, max_tokens=3)
    sched.add(a)
    finished = []
    while not finished:
        batch = sched.schedule()
        finished = sched.postprocess(batch, [0])
    assert a.completion_token_ids == [0, 0, 0]
    assert_all_free(sched.block_manager)


def test_max_tokens_stops_after_exactly_that_many():
    sched = make_scheduler(16)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(1, 5), 4, max_tokens=1, ignore_eos=True)
    b = make_seq(1, prompt_of(2, 5), 4, max_tokens=4, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    batch, finished = step(sched, model)
    assert batch.is_prefill and finished == [a]  # finished by its prefill step
    assert a.num_completion_tokens == 1 and list(sched.running) == [b]
    batches = run_to_end(sched, model)
    assert len(batches) == 3 and b.num_completion_tokens == 4


def test_max_model_len_caps_prompt_plus_completion():
    sched = make_scheduler(16, max_model_len=8)
    model = FakeModel(sched.block_manager)
    a = make_seq(0, prompt_of(1, 6), 4, max_tokens=100, ignore_eos=True)
    b = make_seq(1, prompt_of(2, 8), 4, max_tokens=100, ignore_eos=True)  # at the cap already
    sched.add(a)
    sched.add(b)
    run_to_end(sched, model)
    assert a.num_tokens == 8 and a.num_completion_tokens == 2
    assert b.num_completion_tokens == 1


# ---- abort ------------------------------------------------------------------------------------------


def test_abort_waiting_running_and_half_prefilled_sequences():
    sched = make_scheduler(16, budget=8)
    bm = sched.block_manager
    model = FakeModel(bm)
    running = make_seq(0, prompt_of(1, 8), 4, max_tokens=5, ignore_eos=True)
    sched.add(running)
    step(sched, model)
    assert running.status == SequenceStatus.RUNNING and len(running.block_table) == 2
    chunked = make_seq(1, prompt_of(2, 12), 4, max_tokens=5, ignore_eos=True)
    waiting = make_seq(2, prompt_of(3, 4), 4, max_tokens=5)
    sched.add(chunked)
    sched.add(waiting)
    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [1] and chunked.num_computed_tokens == 8 and len(chunked.block_table) == 3
    free_before = bm.num_free_blocks

    sched.abort(waiting)  # holds no blocks
    assert waiting.status == SequenceStatus.FINISHED and list(sched.waiting) == [chunked]
    assert bm.num_free_blocks == free_before
    bm.check_integrity()

    chunk_hashes = [bm.blocks[b].hash for b in chunked.block_table]
    sched.abort(chunked)  # its third block was hashed at allocation but never computed
    assert chunked.block_table == [] and not sched.waiting
    assert bm.num_free_blocks == free_before + 3
    assert chunk_hashes[2] is not None and chunk_hashes[2] not in bm.hash_to_block_id
    assert chunk_hashes[1] in bm.hash_to_block_id
    bm.check_integrity()

    sched.abort(running)
    assert running.status == SequenceStatus.FINISHED and not sched.running and running.block_table == []
    assert sched.is_finished()
    assert_all_free(bm)


# ---- prefix caching through the scheduler -------------------------------------------------------------


def test_prefix_cache_hit_schedules_fewer_tokens():
    sched = make_scheduler(32, budget=64)
    bm = sched.block_manager
    model = FakeModel(bm)
    first = make_seq(0, prompt_of(1, 10), 4, max_tokens=6, ignore_eos=True)
    sched.add(first)
    run_to_end(sched, model)
    # first holds 16 tokens; 15 were computed: blocks 0-2 (12 tokens) are cached, block 2 filled in decode.
    second = make_seq(1, first.token_ids[:12] + [3, 1], 4, max_tokens=2, ignore_eos=True)
    third = make_seq(2, first.prompt_token_ids[:8] + [2], 4, max_tokens=2, ignore_eos=True)
    sched.add(second)
    sched.add(third)
    batch, _ = step(sched, model)
    assert ids(batch.seqs) == [1, 2] and batch.num_new_tokens == [14 - 12, 9 - 8]
    assert second.num_cached_tokens == 12 and third.num_cached_tokens == 8
    assert second.block_table[:3] == [0, 1, 2] and third.block_table[:2] == [0, 1]
    assert [bm.blocks[b].ref_count for b in (0, 1, 2)] == [2, 2, 1]
    run_to_end(sched, model)
    ref = SamplingParams(max_tokens=2, ignore_eos=True)
    assert second.completion_token_ids == reference_completion(second.prompt_token_ids, ref, EOS, 1024)
    assert third.completion_token_ids == reference_completion(third.prompt_token_ids, ref, EOS, 1024)


def test_exact_duplicate_prompt_recomputes_its_last_block():
    sched = make_scheduler(16)
    model = FakeModel(sched.block_manager)
    prompt = prompt_of(3, 8)  # exactly two blocks
    first = make_seq(0, prompt, 4, max_tokens=1)
    sched.add(first)
    run_to_end(sched, model)
    again = make_seq(1, prompt, 4, max_tokens=3, ignore_eos=True)
    sched.add(again)
    batch, _ = step(sched, model)
    assert batch.num_new_tokens == [4] and again.num_cached_tokens == 4
    assert again.block_table == [0, 2]  # block 0 revived, the last block computed into a fresh one
    run_to_end(sched, model)
    assert again.completion_token_ids == reference_completion(
        prompt, SamplingParams(max_tokens=3, ignore_eos=True), EOS, 1024
    )


def test_block_filled_by_a_sampled_token_is_not_a_hit_before_it_is_computed():
    sched = make_scheduler(16)
    bm = sched.block_manager
    model = FakeModel(bm)
    a = make_seq(0, [1, 2, 3], 4, max_tokens=5, ignore_eos=True)
    sched.add(a)
    step(sched, model)  # prefill of a samples token 4, which fills block 0; its K/V is not computed yet
    assert a.num_tokens == 4 and a.num_computed_tokens == 3
    # A prompt that continues a's tokens (e.g. a shared template the model happens to complete).
    b = make_seq(1, a.token_ids + [9], 4, max_tokens=2, ignore_eos=True)
    sched.add(b)
    batch = sched.schedule()
    bm.check_integrity()
    assert batch.phase == "prefill" and ids(batch.seqs) == [1]
    # b may only skip tokens whose K/V is in the cache: position 3 is not.
    assert b.num_cached_tokens == 0 and batch.num_new_tokens == [5]
    sched.postprocess(batch, model.run(batch))
    run_to_end(sched, model)
    ref = SamplingParams(max_tokens=2, ignore_eos=True)
    assert b.completion_token_ids == reference_completion(b.prompt_token_ids, ref, EOS, 1024)


def test_budget_counts_only_uncached_tokens():
    sched = make_scheduler(32, budget=16)
    model = FakeModel(sched.block_manager)
    first = make_seq(0, prompt_of(5, 9), 4, max_tokens=1)
    sched.add(first)
    run_to_end(sched, model)
    long = make_seq(1, prompt_of(20, 13), 4, max_tokens=1)
    hit = make_seq(2, first.prompt_token_ids[:8] + [1, 2, 3], 4, max_tokens=1)  # 11 tokens, 8 cached
    sched.add(long)
    sched.add(hit)
    batch, _ = step(sched, model)
    # 13 + 11 > 16, but hit needs only 3 new tokens.
    assert ids(batch.seqs) == [1, 2] and batch.num_new_tokens == [13, 3]
    run_to_end(sched, model)


# ---- property: any schedule gives the unconstrained completions -----------------------------------------


@st.composite
def workloads(draw):
    """Requests as (round, prompt, sampling params, steps after arrival to abort it or None), and limits."""
    block_size = draw(st.sampled_from([4, 8]))
    token = st.integers(0, VOCAB - 1)
    prefixes = draw(st.lists(st.lists(token, min_size=1, max_size=32), min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        if requests and draw(st.integers(0, 4)) == 0:  # an exact copy of an earlier prompt
            prompt = list(draw(st.sampled_from(requests))[1])
        else:
            prefix = draw(st.sampled_from(prefixes))
            cut = draw(st.integers(0, len(prefix)))
            suffix = draw(st.lists(token, min_size=0 if cut else 1, max_size=40 - cut))
            prompt = prefix[:cut] + suffix
        sp = SamplingParams(max_tokens=draw(st.integers(1, 12)), ignore_eos=draw(st.booleans()))
        abort_after = draw(st.integers(0, 30)) if draw(st.integers(0, 4)) == 0 else None
        requests.append((draw(st.integers(0, 3)), prompt, sp, abort_after))
    longest_prompt = max(len(r[1]) for r in requests)
    max_model_len = draw(st.one_of(st.just(1024), st.integers(longest_prompt, longest_prompt + 10)))
    need = max(math.ceil((len(p) + sp.max_tokens) / block_size) for _, p, sp, _ in requests)
    return dict(
        block_size=block_size,
        requests=requests,
        num_blocks=need + draw(st.integers(0, 6)),
        max_num_seqs=draw(st.integers(1, 4)),
        budget=draw(st.integers(1, 32)),
        gap=draw(st.integers(1, 6)),
        max_model_len=max_model_len,
    )


def check_step(
    sched: Scheduler,
    batch: ScheduledBatch,
    waiting_before: list[Sequence],
    running_before: list[Sequence],
    head_fits: bool,
) -> None:
    """What one `schedule()` may do, given the queues before it."""
    k = len(batch.seqs)
    assert 1 <= k <= sched.max_num_seqs
    if batch.is_prefill:
        assert head_fits
        assert batch.seqs == waiting_before[:k]  # arrival order, nothing skipped
        assert batch.num_tokens <= sched.max_num_batched_tokens
        for j, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            assert n >= 1 and seq.num_computed_tokens + n <= seq.num_tokens
            if j > 0:
                assert seq.num_computed_tokens + n == seq.num_tokens  # only the first is chunked
        done = [
            s
            for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if s.num_computed_tokens + n == s.num_tokens
        ]
        assert list(sched.running) == running_before + done
        assert list(sched.waiting) == [s for s in waiting_before if s not in done]
    else:
        assert not head_fits  # decode only when no waiting prompt can start
        assert batch.num_new_tokens == [1] * k
        assert batch.seqs == running_before[:k]
        preempted = [s for s in running_before if s.status == SequenceStatus.WAITING]
        # Victims are the most recently admitted ones, back at the front of the queue in order.
        assert preempted == running_before[len(running_before) - len(preempted) :]
        assert list(sched.waiting) == preempted + waiting_before
        assert all(s.block_table == [] and s.num_computed_tokens == 0 for s in preempted)
        assert all(len(s.block_table) == s.num_blocks for s in batch.seqs)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(workloads())
def test_any_schedule_gives_the_unconstrained_completions(w):
    bs = w["block_size"]
    sched = make_scheduler(w["num_blocks"], bs, w["max_num_seqs"], w["budget"], EOS, w["max_model_len"])
    bm = sched.block_manager
    model = FakeModel(bm)
    pending = sorted(enumerate(w["requests"]), key=lambda item: item[1][0])  # stable: by round, then arrival
    seqs: dict[int, Sequence] = {}
    abort_at: dict[int, int] = {}
    aborted: set[int] = set()
    # Every admission samples a token, and every step computes at least one token.
    limit = sum((len(p) + sp.max_tokens) * (sp.max_tokens + 1) for _, p, sp, _ in w["requests"]) + 10
    steps = 0
    while pending or not sched.is_finished():
        while pending and (pending[0][1][0] * w["gap"] <= steps or sched.is_finished()):
            i, (_, prompt, sp, _) = pending.pop(0)
            seqs[i] = Sequence(i, prompt, sp, bs)
            sched.add(seqs[i])
            if w["requests"][i][3] is not None:
                abort_at[i] = steps + w["requests"][i][3]
        for i, seq in seqs.items():
            if abort_at.get(i) == steps and not seq.is_finished:
                sched.abort(seq)
                aborted.add(i)
                assert seq.block_table == [] and seq not in sched.waiting and seq not in sched.running
                bm.check_integrity()
        if sched.is_finished():
            continue
        waiting_before, running_before = list(sched.waiting), list(sched.running)
        head = waiting_before[0] if waiting_before else None
        head_fits = head is not None and (bool(head.block_table) or bm.can_allocate(head))

        batch = sched.schedule()
        bm.check_integrity()
        check_step(sched, batch, waiting_before, running_before, head_fits)
        finished = sched.postprocess(batch, model.run(batch))
        bm.check_integrity()
        for seq in finished:
            assert seq.is_finished and seq.block_table == [] and seq not in sched.running
        steps += 1
        assert steps <= limit, "the scheduler made no progress"

    assert_all_free(bm)
    for i, (_, prompt, sp, _) in enumerate(w["requests"]):
        seq = seqs[i]
        expected = reference_completion(prompt, sp, EOS, w["max_model_len"])
        assert seq.is_finished
        if i in aborted:
            assert seq.completion_token_ids == expected[: seq.num_completion_tokens], i
        else:
            assert seq.completion_token_ids == expected, i
