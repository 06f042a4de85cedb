"""BlockManager on the CPU: exact block ids, reference counts, hashes and eviction order.

Sequences are built directly; "computing" a sequence's tokens is simulated by setting
`num_computed_tokens` the way the scheduler would after a prefill or decode step.
"""

import pickle

import numpy as np
import pytest
import xxhash

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4


def make_seq(seq_id: int, token_ids: list[int], block_size: int = BS) -> Sequence:
    return Sequence(seq_id, list(token_ids), SamplingParams(max_tokens=16), block_size)


def ref_hash(token_ids: list[int], prefix_hash: int | None = None) -> int:
    """The documented block hash, written independently of BlockManager.compute_hash."""
    data = b"" if prefix_hash is None else prefix_hash.to_bytes(8, "little")
    data += b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids)
    return xxhash.xxh64(data).intdigest()


def chain_hashes(token_ids: list[int], block_size: int = BS) -> list[int]:
    """Hashes of every full block of `token_ids`, chained."""
    hashes: list[int] = []
    h = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = ref_hash(token_ids[start : start + block_size], h)
        hashes.append(h)
    return hashes


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and mark the whole prompt computed (what a finished prefill leaves)."""
    bm.allocate(seq)
    bm.check_integrity()
    seq.num_computed_tokens = seq.num_tokens


def refs(bm: BlockManager, block_ids: list[int]) -> list[int]:
    return [bm.blocks[b].ref_count for b in block_ids]


def assert_all_free(bm: BlockManager) -> None:
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert not bm.used_block_ids
    assert all(b.ref_count == 0 for b in bm.blocks)


def toks(start: int, n: int) -> list[int]:
    """n distinct token ids starting at `start`."""
    return list(range(start, start + n))


# ---- construction and plain allocation -------------------------------------------------------


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_constructor_rejects_empty_cache(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_allocation_hands_out_block_ids_in_order():
    bm = BlockManager(10, BS)
    assert list(bm.free_block_ids) == list(range(10))
    a = make_seq(0, toks(100, 10))  # 3 blocks, the last one partial
    bm.allocate(a)
    assert a.block_table == [0, 1, 2]
    assert refs(bm, [0, 1, 2]) == [1, 1, 1]
    assert a.num_cached_tokens == 0 and a.num_computed_tokens == 0
    b = make_seq(1, toks(200, 5))
    bm.allocate(b)
    assert b.block_table == [3, 4]
    assert list(bm.free_block_ids) == [5, 6, 7, 8, 9]
    assert bm.used_block_ids == {0, 1, 2, 3, 4}
    assert bm.num_free_blocks == 5
    bm.check_integrity()
    bm.deallocate(a)
    bm.deallocate(b)
    assert a.block_table == [] and b.block_table == []
    assert_all_free(bm)


def test_allocate_twice_is_a_value_error():
    bm = BlockManager(4, BS)
    a = make_seq(0, toks(1, 5))
    bm.allocate(a)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate(a)
    assert a.block_table == [0, 1]
    bm.check_integrity()
    bm.deallocate(a)
    assert_all_free(bm)


# ---- hashing ---------------------------------------------------------------------------------


def test_compute_hash_is_xxh64_of_prefix_hash_and_int64_tokens():
    tokens = [1, 2, 3, 151_935]
    first = BlockManager.compute_hash(tokens)
    raw = np.array(tokens, dtype="<i8").tobytes()
    assert first == xxhash.xxh64(raw).intdigest()
    assert first == ref_hash(tokens)
    # Token ids that need more than 4 bytes must not be truncated.
    big = [2**40 + 7, 3, 2**33, 0]
    assert BlockManager.compute_hash(big) == ref_hash(big)
    assert BlockManager.compute_hash(big) != BlockManager.compute_hash([7, 3, 0, 0])

    second_tokens = [9, 8, 7, 6]
    chained = BlockManager.compute_hash(second_tokens, first)
    raw = first.to_bytes(8, "little") + np.array(second_tokens, dtype="<i8").tobytes()
    assert chained == xxhash.xxh64(raw).intdigest()
    # A chained hash differs from the same tokens hashed without a prefix, and from another prefix.
    assert chained != BlockManager.compute_hash(second_tokens)
    assert chained != BlockManager.compute_hash(second_tokens, ref_hash([1, 2, 3, 4]))
    # "No prefix" is not the same as a prefix hash of 0 (eight zero bytes are hashed then).
    assert BlockManager.compute_hash(second_tokens, 0) == ref_hash(second_tokens, 0)
    assert BlockManager.compute_hash(second_tokens, 0) != BlockManager.compute_hash(second_tokens)


def test_only_full_blocks_get_a_hash():
    bm = BlockManager(8, BS)
    tokens = toks(10, 10)  # blocks of 4, 4, 2 tokens
    a = make_seq(0, tokens)
    bm.allocate(a)
    h0, h1 = chain_hashes(tokens)
    assert [bm.blocks[b].hash for b in a.block_table] == [h0, h1, None]
    assert bm.blocks[0].token_ids == tokens[0:4]
    assert bm.blocks[1].token_ids == tokens[4:8]
    assert bm.blocks[2].token_ids == []
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    bm.check_integrity()
    a.num_computed_tokens = a.num_tokens
    bm.deallocate(a)
    assert_all_free(bm)


def test_same_tokens_after_different_prefixes_do_not_hit():
    bm = BlockManager(8, BS)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(bm, a)
    b = make_seq(1, [9, 9, 9, 9, 5, 6, 7, 8, 9])  # block 1 has the same tokens as a's block 1
    assert bm.num_cached_tokens(b) == 0
    assert bm.num_blocks_to_allocate(b) == 3
    prefill(bm, b)
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3, 4, 5]
    assert bm.blocks[1].token_ids == bm.blocks[4].token_ids
    assert bm.blocks[1].hash != bm.blocks[4].hash
    assert b.num_cached_tokens == 0
    bm.deallocate(a)
    bm.deallocate(b)
    assert_all_free(bm)


# ---- prefix hits -----------------------------------------------------------------------------


def test_prefix_hit_shares_leading_blocks():
    bm = BlockManager(8, BS)
    a_tokens = toks(100, 13)  # 3 full blocks + 1 token
    a = make_seq(0, a_tokens)
    prefill(bm, a)
    assert a.block_table == [0, 1, 2, 3]

    b = make_seq(1, a_tokens[:8] + [7, 7, 7, 7, 7])  # shares the first two blocks
    assert bm.num_cached_tokens(b) == 8
    assert bm.num_blocks_to_allocate(b) == 2  # the two hits are in use: free of cost
    assert bm.can_allocate(b)
    bm.allocate(b)
    bm.check_integrity()
    assert b.block_table == [0, 1, 4, 5]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert refs(bm, [0, 1, 2, 3, 4, 5]) == [2, 2, 1, 1, 1, 1]
    assert bm.blocks[4].hash == chain_hashes(b.token_ids)[2]
    b.num_computed_tokens = b.num_tokens

    bm.deallocate(a)  # releases 3, 2, then only drops the references to 1 and 0
    bm.check_integrity()
    assert refs(bm, [0, 1]) == [1, 1]
    assert list(bm.free_block_ids) == [6, 7, 3, 2]
    bm.deallocate(b)
    assert list(bm.free_block_ids) == [6, 7, 3, 2, 5, 4, 1, 0]
    assert_all_free(bm)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_prefix_hit_any_block_size(block_size):
    bm = BlockManager(16, block_size)
    tokens = toks(50, 3 * block_size + 1)
    a = make_seq(0, tokens, block_size)
    prefill(bm, a)
    b = make_seq(1, tokens[: 2 * block_size] + [999], block_size)
    assert bm.num_cached_tokens(b) == 2 * block_size
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_computed_tokens == 2 * block_size
    assert refs(bm, a.block_table) == [2, 2, 1, 1]
    bm.check_integrity()
    b.num_computed_tokens = b.num_tokens
    bm.deallocate(b)
    bm.deallocate(a)
    assert_all_free(bm)


def test_exact_copy_prompt_recomputes_its_last_block():
    bm = BlockManager(8, BS)
    tokens = toks(30, 8)  # exactly two full blocks
    a = make_seq(0, tokens)
    prefill(bm, a)
    assert a.block_table == [0, 1]
    b = make_seq(1, tokens)
    assert bm.num_cached_tokens(b) == 4  # block 1 matches, but the prompt's last block is computed
    assert bm.num_blocks_to_allocate(b) == 1
    bm.allocate(b)
    bm.check_integrity()
    assert b.block_table == [0, 2]
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4
    assert refs(bm, [0, 1, 2]) == [2, 1, 1]
    # Both copies of the last block carry the same (valid) hash.
    assert bm.blocks[1].hash == bm.blocks[2].hash == chain_hashes(tokens)[1]
    b.num_computed_tokens = b.num_tokens
    bm.deallocate(a)
    bm.deallocate(b)
    assert_all_free(bm)

    # A one-block prompt copied exactly has nothing to reuse.
    c = make_seq(2, toks(30, 4))
    assert bm.num_cached_tokens(c) == 0
    bm.allocate(c)
    assert c.num_computed_tokens == 0
    bm.deallocate(c)
    assert_all_free(bm)


def test_forged_hash_collision_with_other_tokens_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(BlockManager, "compute_hash", staticmethod(lambda token_ids, prefix_hash=None: 1234))
    bm = BlockManager(8, BS)
    a = make_seq(0, [1, 2, 3, 4, 5])
    prefill(bm, a)
    assert bm.hash_to_block_id == {1234: 0}
    b = make_seq(1, [4, 3, 2, 1, 5])  # same (forged) hash, other tokens
    assert bm.num_cached_tokens(b) == 0
    assert bm.num_blocks_to_allocate(b) == 2
    bm.allocate(b)
    assert b.block_table == [2, 3]
    assert b.num_computed_tokens == 0
    assert refs(bm, [0, 1, 2, 3]) == [1, 1, 1, 1]
    bm.check_integrity()
    # Same tokens with the same hash still hit: the token check is what rejected b.
    c = make_seq(2, [4, 3, 2, 1, 6])
    assert bm.num_cached_tokens(c) == 4
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.deallocate(seq)
    assert_all_free(bm)


def test_hash_map_entry_pointing_at_other_tokens_is_not_a_hit():
    bm = BlockManager(8, BS)
    a = make_seq(0, [1, 2, 3, 4, 5])
    prefill(bm, a)
    wanted = [9, 9, 9, 9]
    forged = ref_hash(wanted)
    # Make a's block 0 claim the hash of `wanted` while it still holds a's tokens.
    del bm.hash_to_block_id[bm.blocks[0].hash]
    bm.blocks[0].hash = forged
    bm.hash_to_block_id[forged] = 0
    bm.check_integrity()
    b = make_seq(1, wanted + [5])
    assert bm.num_cached_tokens(b) == 0
    bm.allocate(b)
    assert b.block_table == [2, 3]
    assert bm.blocks[0].ref_count == 1
    b.num_computed_tokens = b.num_tokens
    bm.deallocate(a)
    bm.deallocate(b)
    assert_all_free(bm)


# ---- freed blocks: revival and eviction --------------------------------------------------------


def test_freed_blocks_keep_their_hash_and_are_revived():
    bm = BlockManager(8, BS)
    tokens = toks(40, 9)
    a = make_seq(0, tokens)
    prefill(bm, a)
    h0, h1 = chain_hashes(tokens)
    bm.deallocate(a)
    assert_all_free(bm)
    assert list(bm.free_block_ids) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.blocks[0].hash == h0 and bm.blocks[1].hash == h1
    assert bm.hash_to_block_id == {h0: 0, h1: 1}

    b = make_seq(1, tokens[:8] + [77, 78])
    assert bm.num_cached_tokens(b) == 8
    assert bm.num_blocks_to_allocate(b) == 3  # revived blocks come off the free list
    bm.allocate(b)
    bm.check_integrity()
    assert b.block_table == [0, 1, 3]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert refs(bm, [0, 1, 3]) == [1, 1, 1]
    assert list(bm.free_block_ids) == [4, 5, 6, 7, 2]
    b.num_computed_tokens = b.num_tokens
    bm.deallocate(b)
    assert_all_free(bm)


def test_reused_block_loses_its_old_hash():
    bm = BlockManager(5, BS)
    tokens = toks(40, 9)
    a = make_seq(0, tokens)
    prefill(bm, a)
    h0, h1 = chain_hashes(tokens)
    bm.deallocate(a)
    assert list(bm.free_block_ids) == [3, 4, 2, 1, 0]

    c = make_seq(1, toks(500, 16))  # needs 4 blocks: 3, 4, 2 and then a's block 1
    prefill(bm, c)
    assert c.block_table == [3, 4, 2, 1]
    assert h1 not in bm.hash_to_block_id
    assert bm.blocks[1].hash == chain_hashes(c.token_ids)[3]
    assert bm.hash_to_block_id[h0] == 0 and bm.blocks[0].ref_count == 0

    b = make_seq(2, tokens)
    assert bm.num_cached_tokens(b) == 4  # block 0 is still cached, block 1 is gone
    assert not bm.can_allocate(b)  # needs 3 free blocks (block 0 revived + 2 new), 1 is free
    c_hashes = chain_hashes(c.token_ids)
    bm.deallocate(c)
    assert list(bm.free_block_ids) == [0, 1, 2, 4, 3]
    bm.allocate(b)
    # Block 0 is revived; block 1 (oldest free) is handed out again, now for b's second block.
    assert b.block_table == [0, 1, 2]
    assert b.num_computed_tokens == 4
    assert bm.blocks[1].hash == h1 and bm.hash_to_block_id[h1] == 1
    assert c_hashes[2] not in bm.hash_to_block_id and c_hashes[3] not in bm.hash_to_block_id
    assert bm.blocks[2].hash is None  # b's partial last block
    assert [bm.hash_to_block_id[h] for h in c_hashes[:2]] == [3, 4]  # c's untouched blocks stay cached
    bm.check_integrity()
    b.num_computed_tokens = b.num_tokens
    bm.deallocate(b)
    assert_all_free(bm)


def test_eviction_takes_the_oldest_freed_block_first():
    bm = BlockManager(6, BS)
    a_tokens, b_tokens = toks(100, 8), toks(200, 8)
    a, b = make_seq(0, a_tokens), make_seq(1, b_tokens)
    prefill(bm, a)
    prefill(bm, b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    bm.deallocate(a)
    bm.deallocate(b)
    # Each sequence's blocks go to the back of the queue last block first.
    assert list(bm.free_block_ids) == [4, 5, 1, 0, 3, 2]

    c = make_seq(2, toks(300, 3))
    bm.allocate(c)
    assert c.block_table == [4]
    d = make_seq(3, toks(400, 12))
    bm.allocate(d)
    assert d.block_table == [5, 1, 0]  # a's blocks, freed first, are evicted before b's
    assert list(bm.free_block_ids) == [3, 2]
    bm.check_integrity()
    # a's prefix is gone, b's (freed later) is still cached.
    assert bm.num_cached_tokens(make_seq(4, a_tokens)) == 0
    assert bm.num_cached_tokens(make_seq(5, b_tokens)) == 4
    assert bm.num_cached_tokens(make_seq(6, b_tokens + [1])) == 8
    for seq in (c, d):
        seq.num_computed_tokens = seq.num_tokens
        bm.deallocate(seq)
    assert_all_free(bm)


# ---- capacity ----------------------------------------------------------------------------------


def test_can_allocate_counts_in_use_hits_as_free_and_revived_hits_as_cost():
    bm = BlockManager(4, BS)
    tokens = toks(60, 9)
    a = make_seq(0, tokens)
    prefill(bm, a)
    assert bm.num_free_blocks == 1

    big = make_seq(1, tokens[:8] + toks(900, 5))  # 4 blocks, 2 of them hits on a's in-use blocks
    assert bm.num_blocks_to_allocate(big) == 2
    assert not bm.can_allocate(big)
    with pytest.raises(ValueError, match="needs 2 free KV blocks, only 1"):
        bm.allocate(big)
    bm.check_integrity()
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert refs(bm, [0, 1, 2, 3]) == [1, 1, 1, 0]

    small = make_seq(2, tokens[:8] + [5])  # 3 blocks, 2 hits in use: needs 1
    assert bm.num_blocks_to_allocate(small) == 1
    assert bm.can_allocate(small)
    bm.allocate(small)
    assert small.block_table == [0, 1, 3]
    assert bm.num_free_blocks == 0
    bm.check_integrity()
    small.num_computed_tokens = small.num_tokens
    bm.deallocate(small)
    bm.deallocate(a)
    assert_all_free(bm)

    # Now the same hits are on free blocks: each revived block costs a free block.
    assert bm.num_cached_tokens(big) == 8
    assert bm.num_blocks_to_allocate(big) == 4
    assert bm.can_allocate(big)
    bm.allocate(big)
    assert big.block_table[:2] == [0, 1]
    assert bm.num_free_blocks == 0
    too_many = make_seq(3, toks(700, 1))
    assert not bm.can_allocate(too_many)
    with pytest.raises(ValueError):
        bm.allocate(too_many)
    big.num_computed_tokens = big.num_tokens
    bm.deallocate(big)
    assert_all_free(bm)


# ---- decode --------------------------------------------------------------------------------------


def test_may_append_adds_a_block_exactly_when_a_token_starts_one():
    bm = BlockManager(6, BS)
    seq = make_seq(0, toks(10, 3))
    prefill(bm, seq)
    assert seq.block_table == [0]
    sizes = []
    for step in range(10):
        seq.append_token(50 + step)  # what postprocess does after the step that sampled it
        needs_block = seq.num_tokens % BS == 1
        assert bm.can_append(seq)
        free_before = bm.num_free_blocks
        bm.may_append(seq)
        bm.check_integrity()
        assert bm.num_free_blocks == free_before - int(needs_block)
        assert len(seq.block_table) == seq.num_blocks
        sizes.append(len(seq.block_table))
        seq.num_computed_tokens += 1  # the decode step computes the newest token
        assert seq.num_computed_tokens == seq.num_tokens
    # tokens 4..13: a new block when the 5th and 9th and 13th token arrive
    assert sizes == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert seq.block_table == [0, 1, 2, 3]

    # Blocks filled during decode carry the chained hash of the prompt + generated tokens.
    expected = chain_hashes(seq.token_ids)
    assert [bm.blocks[b].hash for b in seq.block_table[:3]] == expected
    assert bm.blocks[3].hash is None

    seq.append_token(99)  # final token, sampled but never computed
    bm.deallocate(seq)
    assert_all_free(bm)
    later = make_seq(1, seq.token_ids[:12] + [1, 2])
    assert bm.num_cached_tokens(later) == 12
    bm.allocate(later)
    assert later.block_table[:3] == [0, 1, 2]
    assert later.num_computed_tokens == 12
    bm.deallocate(later)
    assert_all_free(bm)


def test_may_append_without_a_free_block():
    bm = BlockManager(2, BS)
    a = make_seq(0, toks(1, 4))
    b = make_seq(1, toks(20, 4))
    prefill(bm, a)
    prefill(bm, b)
    a.append_token(7)  # token 5 starts a second block, none is free
    assert not bm.can_append(a)
    with pytest.raises(ValueError, match="no free KV block"):
        bm.may_append(a)
    bm.check_integrity()
    assert a.block_table == [0]
    bm.deallocate(b)
    assert bm.can_append(a)
    bm.may_append(a)
    assert a.block_table == [0, 1]
    bm.deallocate(a)
    assert_all_free(bm)


def test_decode_block_after_a_prefix_hit_gets_the_chained_hash():
    bm = BlockManager(8, BS)
    prompt = toks(10, 6)
    a = make_seq(0, prompt)
    prefill(bm, a)
    b = make_seq(1, prompt[:4] + [1, 2])
    bm.allocate(b)
    assert b.block_table == [0, 2]
    b.num_computed_tokens = b.num_tokens
    b.append_token(3)
    bm.may_append(b)
    b.num_computed_tokens += 1
    b.append_token(4)
    bm.may_append(b)  # block 2 is now full
    assert bm.blocks[2].hash == chain_hashes(b.token_ids)[1]
    assert bm.hash_to_block_id[bm.blocks[2].hash] == 2
    bm.check_integrity()
    b.num_computed_tokens += 1
    bm.deallocate(a)
    bm.deallocate(b)
    assert_all_free(bm)


# ---- block hashes memoised on the sequence -----------------------------------------------------


@pytest.fixture
def hashed(monkeypatch) -> list[tuple[int, ...]]:
    """The blocks BlockManager.compute_hash is called on, in order."""
    calls: list[tuple[int, ...]] = []
    original = BlockManager.compute_hash

    def counting(token_ids, prefix_hash=None):
        calls.append(tuple(token_ids))
        return original(token_ids, prefix_hash)

    monkeypatch.setattr(BlockManager, "compute_hash", staticmethod(counting))
    return calls


def test_prefix_lookups_of_a_waiting_prompt_hash_it_once(hashed):
    bm = BlockManager(8, BS)
    a = make_seq(0, toks(10, 13))
    prefill(bm, a)
    b = make_seq(1, toks(10, 12) + [99])  # hits a's 3 full blocks
    del hashed[:]
    for _ in range(5):  # five scheduling passes that do not admit b
        hits = bm.prefix_hits(b)
        assert hits == a.block_table[:3]
        assert bm.can_allocate(b, hits) and bm.num_cached_tokens(b, hits) == 12
    assert hashed == [tuple(b.block(i)) for i in range(3)]
    assert b.block_hashes == chain_hashes(b.token_ids)
    bm.allocate(b)  # looks the prompt up again, hashing nothing
    assert len(hashed) == 3 and b.num_cached_tokens == 12
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.deallocate(seq)
    assert_all_free(bm)


def test_preempted_sequence_hits_its_completion_blocks_without_rehashing(hashed):
    bm = BlockManager(8, BS)
    a = make_seq(0, toks(10, 6))
    prefill(bm, a)
    for t in range(7):  # decode 7 tokens: blocks 1 and 2 (with completion tokens) fill up
        a.append_token(40 + t)
        bm.may_append(a)
        a.num_computed_tokens += 1
    assert a.num_tokens == 13 and a.block_hashes == chain_hashes(a.token_ids)
    assert len(hashed) == 3  # each full block once, as it filled
    bm.deallocate(a)  # preempted: its computed blocks keep their hashes
    assert bm.prefix_hits(a) == [0, 1, 2]  # the memo grew with the completion: no hash now
    bm.allocate(a)
    assert len(hashed) == 3 and a.num_cached_tokens == 12
    a.num_computed_tokens = a.num_tokens
    bm.deallocate(a)
    assert_all_free(bm)


def test_nothing_is_hashed_with_prefix_caching_off(hashed):
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(0, toks(10, 13))
    prefill(bm, a)
    for t in range(4):  # decode fills block 3
        a.append_token(40 + t)
        bm.may_append(a)
        a.num_computed_tokens += 1
    assert hashed == [] and a.block_hashes == []
    a.num_computed_tokens = a.num_tokens
    bm.deallocate(a)
    assert_all_free(bm)


def test_memoised_hashes_skip_placeholders_follow_truncation_and_forks_and_stay_behind_in_pickles():
    bm = BlockManager(8, BS)
    a = make_seq(0, toks(10, 7))
    prefill(bm, a)
    a.append_token(PLACEHOLDER_TOKEN)  # fills block 1 with a token not read back yet
    bm.may_append(a)  # not hashed until its value is known
    assert a.block_hashes == chain_hashes(a.token_ids)[:1]
    assert bm.prefix_hits(a) == [0]
    assert len(a.block_hashes) == 1  # the block holding the placeholder is not memoised
    a.token_ids[-1] = 50
    bm.hash_filled_block(a, 7)
    assert a.block_hashes == chain_hashes(a.token_ids) and bm.blocks[1].hash == a.block_hashes[1]
    a.truncate(6)  # cuts block 1: its hash goes
    assert a.block_hashes == chain_hashes(a.token_ids)[:1]
    for t in (51, 52, 53):
        a.append_token(t)
    assert bm.prefix_hits(a) == [0]  # block 1 now holds other tokens: hashed anew, a miss
    assert a.block_hashes == chain_hashes(a.token_ids) and len(a.block_hashes) == 2

    b = make_seq(1, toks(20, 9))
    prefill(bm, b)
    child = b.fork(2, b.params)
    assert child.block_hashes == b.block_hashes == chain_hashes(b.token_ids)
    assert child.block_hashes is not b.block_hashes
    b.num_computed_tokens -= 1  # as in a batch sent to tensor-parallel workers: a token to compute
    copy = pickle.loads(pickle.dumps(b))
    assert copy.block_hashes == [] and b.block_hashes == chain_hashes(b.token_ids)
    sent = pickle.dumps(b)  # the hashes (little-endian in a pickle) are not among what is sent
    assert not any(h.to_bytes(8, "little") in sent for h in b.block_hashes)
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.deallocate(seq)
    assert_all_free(bm)


# ---- deallocation of partly computed sequences -------------------------------------------------


def test_deallocate_drops_hashes_of_uncomputed_blocks():
    bm = BlockManager(8, BS)
    tokens = toks(70, 13)
    a = make_seq(0, tokens)
    bm.allocate(a)
    h0, h1, h2 = chain_hashes(tokens)
    assert bm.hash_to_block_id == {h0: 0, h1: 1, h2: 2}
    a.num_computed_tokens = 6  # a prefill chunk covered block 0 and half of block 1
    bm.deallocate(a)
    assert_all_free(bm)
    assert a.num_computed_tokens == 0 and a.num_cached_tokens == 0 and a.block_table == []
    assert bm.hash_to_block_id == {h0: 0}
    assert bm.blocks[0].hash == h0
    assert bm.blocks[1].hash is None and bm.blocks[2].hash is None
    again = make_seq(1, tokens)
    assert bm.num_cached_tokens(again) == 4
    assert bm.num_blocks_to_allocate(again) == 4

    # Nothing computed at all: nothing survives.
    bm2 = BlockManager(8, BS)
    b = make_seq(2, tokens)
    bm2.allocate(b)
    bm2.deallocate(b)
    assert bm2.hash_to_block_id == {}
    assert bm2.num_cached_tokens(make_seq(3, tokens)) == 0
    assert_all_free(bm2)


def test_deallocate_keeps_shared_hit_blocks_of_an_unstarted_sequence():
    bm = BlockManager(8, BS)
    tokens = toks(70, 9)
    a = make_seq(0, tokens)
    prefill(bm, a)
    b = make_seq(1, tokens[:8] + [5, 6, 7, 8, 9])  # hits blocks 0 and 1, then 2 new full+partial
    bm.allocate(b)
    assert b.block_table == [0, 1, 3, 4]
    hb = chain_hashes(b.token_ids)[2]
    assert bm.hash_to_block_id[hb] == 3
    bm.deallocate(b)  # aborted before its own blocks were computed
    bm.check_integrity()
    assert hb not in bm.hash_to_block_id
    assert refs(bm, [0, 1]) == [1, 1]
    assert bm.num_cached_tokens(make_seq(2, tokens[:8] + [1])) == 8
    bm.deallocate(a)
    assert_all_free(bm)


# ---- integrity checking ------------------------------------------------------------------------


def _corrupt_double_free(bm):
    bm.free_block_ids.append(bm.free_block_ids[0])


def _corrupt_free_and_used(bm):
    bm.used_block_ids.add(bm.free_block_ids[0])


def _corrupt_lost_block(bm):
    bm.free_block_ids.popleft()


def _corrupt_used_ref_zero(bm):
    bm.blocks[0].ref_count = 0


def _corrupt_free_ref_one(bm):
    bm.blocks[bm.free_block_ids[-1]].ref_count = 1


def _corrupt_map_to_wrong_block(bm):
    h = bm.blocks[0].hash
    bm.hash_to_block_id[h] = 1


def _corrupt_partial_hashed_block(bm):
    bm.blocks[2].hash = 42


def _corrupt_used_set_missing(bm):
    bm.used_block_ids.discard(0)


CORRUPTIONS = [
    _corrupt_double_free,
    _corrupt_free_and_used,
    _corrupt_lost_block,
    _corrupt_used_ref_zero,
    _corrupt_free_ref_one,
    _corrupt_map_to_wrong_block,
    _corrupt_partial_hashed_block,
    _corrupt_used_set_missing,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_check_integrity_catches_corruption(corrupt):
    bm = BlockManager(6, BS)
    a = make_seq(0, toks(1, 10))  # blocks 0, 1 hashed, block 2 partial
    bm.allocate(a)
    bm.check_integrity()
    corrupt(bm)
    with pytest.raises(AssertionError):
        bm.check_integrity()
