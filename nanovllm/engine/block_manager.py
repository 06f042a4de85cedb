"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

A block gets a hash only once it is full: xxh64 over the previous block's hash (8 bytes,
little-endian; absent for a sequence's first block) followed by the block's token ids. A map from
hash to block id lets a new prompt reuse every leading full block whose hash and tokens match. Freed
blocks keep their hash and can be revived by a later hit until they are handed out for new data.

With a sliding attention window in every layer (`sliding_window`), a block that lies wholly before the
window of a sequence's next query is never read again: it is released as the sequence advances
(`free_outside_window`) and its table entry becomes FREED_BLOCK; prefix hits before the first query's
window are never taken. A step of C new tokens reads the W - 1 keys before its first query and writes
C more: W + C - 1 positions, which straddle at most (W + C - 1) / block_size + 2 blocks (one partial
block at each end); one older block is kept so that the newest one's hash can chain to it. So a
sequence holds at most (W + C - 1) / block_size + 3 blocks however long it grows (`most_blocks_held`).
Released blocks keep their hash like any free one.
"""

from collections import deque

import numpy as np
import xxhash

from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence

# A block-table entry whose block was released because it lies wholly before every later query's
# sliding window (never read again; the model runner passes a valid id in its place).
FREED_BLOCK = -1


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    """Owns `num_blocks` KV-cache blocks of `block_size` token slots each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} blocks of {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.block_size = block_size
        # The attention window of every layer (the largest if they differ), or None when some layer
        # sees the whole context: then no block is released before its sequence ends.
        self.sliding_window = sliding_window
        # False: no block is ever hashed, so nothing is shared between requests (forks of one request
        # still share their prompt blocks).
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Free blocks in the order they were freed: new data takes the oldest first, so recently
        # freed (likely to be hit again) blocks keep their contents longest.
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @staticmethod
    def compute_hash(token_ids: list[int], prefix_hash: int | None = None) -> int:
        """Hash of a full block, chained to the hash of the block before it."""
        h = xxhash.xxh64()
        if prefix_hash is not None:
            h.update(prefix_hash.to_bytes(8, "little"))
        h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
        return h.intdigest()

    def _block_hash(self, seq: Sequence, i: int, prefix_hash: int | None) -> int:
        """`compute_hash(seq.block(i), prefix_hash)` for full block `i` of `seq`, memoised in
        `seq.block_hashes`: a waiting prompt is hashed once, not on every scheduling pass. A memoised
        hash is used only where `prefix_hash` is the memoised hash of the block before (the chain it was
        computed on); a block holding a placeholder token is hashed but not memoised (its tokens change)."""
        hashes = seq.block_hashes
        chained = prefix_hash is None if i == 0 else i <= len(hashes) and hashes[i - 1] == prefix_hash
        if chained and i < len(hashes):
            return hashes[i]
        token_ids = seq.block(i)
        h = self.compute_hash(token_ids, prefix_hash)
        if (
            chained
            and i == len(hashes)
            and len(token_ids) == self.block_size
            and PLACEHOLDER_TOKEN not in token_ids
        ):
            hashes.append(h)
        return h

    # ---- internal helpers --------------------------------------------------------------------

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = None
        block.token_ids = []

    def _take_free_block(self, block_id: int | None = None) -> Block:
        """Move a free block to the used set: the oldest freed one, or `block_id` (a revival)."""
        if block_id is None:
            block_id = self.free_block_ids.popleft()
            block = self.blocks[block_id]
            self._forget_hash(block)  # reused for new data: its old contents are gone
        else:
            self.free_block_ids.remove(block_id)
            block = self.blocks[block_id]
        assert block.ref_count == 0, block
        block.ref_count = 1
        self.used_block_ids.add(block_id)
        return block

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, block
        if block.ref_count == 0:
            self.used_block_ids.remove(block_id)
            self.free_block_ids.append(block_id)

    def _register(self, block: Block, h: int, token_ids: list[int]) -> None:
        if not self.enable_prefix_caching:
            return
        block.hash = h
        block.token_ids = list(token_ids)
        self.hash_to_block_id[h] = block.block_id

    def _lookup(self, h: int, token_ids: list[int]) -> int | None:
        block_id = self.hash_to_block_id.get(h)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the sequence's leading cached blocks (never its last block). Pass the result
        to the methods below to look the prompt up once per pass; the hashes themselves are computed
        once per sequence (`seq.block_hashes`)."""
        hits: list[int] = []
        if seq.params is not None and seq.params.prompt_logprobs is not None:
            return hits  # every prompt position must be computed to have its logits
        h: int | None = None
        for i in range(
            seq.num_blocks - 1 if self.enable_prefix_caching else 0
        ):  # the last block of a prompt is always computed
            token_ids = seq.block(i)
            h = self._block_hash(seq, i, h)
            block_id = self._lookup(h, token_ids)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # ---- public API --------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _first_hit_needed(self, hits: list[int]) -> int:
        """Index of the first of `hits` that the sequence's first query (at the first position after
        them) can see: with a sliding window the blocks before it are never read, so `allocate` does
        not take them. Always keeps the last hit, whose hash the blocks after it chain to."""
        if self.sliding_window is None or not hits:
            return 0
        first_needed = len(hits) * self.block_size - self.sliding_window + 1  # oldest key it sees
        return max(0, min(first_needed // self.block_size, len(hits) - 1))

    def num_blocks_to_allocate(
        self, seq: Sequence, hits: list[int] | None = None, num_tokens: int | None = None
    ) -> int:
        """Free blocks that `allocate(seq, hits, num_tokens)` would consume (revived cached blocks
        count as free; hits before the first query's window are not taken)."""
        hits = self.prefix_hits(seq) if hits is None else hits
        end = seq.num_blocks if num_tokens is None else max(self._blocks_for(num_tokens), len(hits))
        skip = self._first_hit_needed(hits)
        return end - skip - sum(1 for b in hits[skip:] if self.blocks[b].ref_count > 0)

    def num_cached_tokens(self, seq: Sequence, hits: list[int] | None = None) -> int:
        """Leading tokens of `seq` that `allocate` would take from the prefix cache."""
        return len(self.prefix_hits(seq) if hits is None else hits) * self.block_size

    def can_allocate(
        self, seq: Sequence, hits: list[int] | None = None, num_tokens: int | None = None
    ) -> bool:
        """Whether every block of `seq` (of its first `num_tokens` tokens) can be allocated now."""
        return self.num_blocks_to_allocate(seq, hits, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] | None = None, num_tokens: int | None = None) -> None:
        """Give `seq` a block table for all its tokens (or its first `num_tokens`: `extend` adds the
        others later), reusing cached prefix blocks.

        Sets `seq.num_cached_tokens` and `seq.num_computed_tokens` to the tokens covered by hits. With
        a sliding window, hits wholly before the window of the first query are left where they are
        (not referenced, not revived) and their entries are FREED_BLOCK, as if released already: a long
        cached prefix then costs no more blocks than the window does.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        hits = self.prefix_hits(seq) if hits is None else hits
        if not self.can_allocate(seq, hits, num_tokens):
            raise ValueError(
                f"sequence {seq.seq_id} needs {self.num_blocks_to_allocate(seq, hits, num_tokens)} free KV "
                f"blocks, only {self.num_free_blocks} are free"
            )
        skip = self._first_hit_needed(hits)
        seq.block_table.extend([FREED_BLOCK] * skip)
        for block_id in hits[skip:]:
            block = self.blocks[block_id]
            if block.ref_count > 0:
                block.ref_count += 1
            else:
                self._take_free_block(block_id)
            seq.block_table.append(block_id)
        end = seq.num_blocks if num_tokens is None else max(self._blocks_for(num_tokens), len(hits))
        self._append_blocks(seq, end)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens

    def _append_blocks(self, seq: Sequence, end: int) -> None:
        """Fresh blocks for table entries len(table)..end-1, full ones hashed (chained to the entry
        before, which is never a released one: the two newest entries are kept)."""
        table = seq.block_table
        h = self.blocks[table[-1]].hash if table and table[-1] != FREED_BLOCK else None
        for i in range(len(table), end):
            block = self._take_free_block()
            token_ids = seq.block(i)
            if self.enable_prefix_caching and len(token_ids) == self.block_size and (i == 0 or h is not None):
                h = self._block_hash(seq, i, h)
                self._register(block, h, token_ids)
            else:
                h = None  # the chain stops at a partial or unhashed block
            table.append(block.block_id)

    def extend(self, seq: Sequence, num_tokens: int) -> bool:
        """Add blocks so that the table of `seq` covers its first `num_tokens` tokens (a prefill chunk
        of a sequence allocated in part); False, taking nothing, if too few blocks are free."""
        end = min(self._blocks_for(num_tokens), seq.num_blocks)
        if end - len(seq.block_table) > self.num_free_blocks:
            return False
        self._append_blocks(seq, end)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child`, a new sequence with `parent`'s prompt, `parent`'s blocks: the full ones shared
        (reference count + 1), a partly filled last one replaced by a fresh block, since each completion
        writes its own tokens there. Returns (source, destination) block ids of the K/V copy that the
        model runner must make once the parent's prompt is computed, or None when every block is full.
        """
        if child.block_table:
            raise ValueError(f"sequence {child.seq_id} already holds blocks {child.block_table}")
        num_full = parent.num_tokens // self.block_size
        copy = None
        if num_full < len(parent.block_table) and not self.free_block_ids:
            raise ValueError(f"no free KV block to fork sequence {parent.seq_id}")
        for block_id in parent.block_table[:num_full]:
            if block_id != FREED_BLOCK:
                self.blocks[block_id].ref_count += 1
            child.block_table.append(block_id)
        if num_full < len(parent.block_table):
            block = self._take_free_block()
            child.block_table.append(block.block_id)
            copy = (parent.block_table[num_full], block.block_id)
        child.num_cached_tokens = parent.num_cached_tokens
        return copy

    def deallocate(self, seq: Sequence) -> None:
        """Release every block of `seq`. Blocks whose K/V were never fully computed lose their hash."""
        for i in reversed(range(len(seq.block_table))):
            if seq.block_table[i] == FREED_BLOCK:
                continue
            block = self.blocks[seq.block_table[i]]
            if (i + 1) * self.block_size > seq.num_computed_tokens and block.ref_count == 1:
                self._forget_hash(block)
            self._release(block.block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step of `seq` can get the block it may need."""
        return self.num_free_blocks >= seq.num_blocks - len(seq.block_table)

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: add a block if the newest token starts one, hash a block it fills."""
        if seq.num_blocks > len(seq.block_table):
            if not self.free_block_ids:
                raise ValueError(f"no free KV block for sequence {seq.seq_id}")
            seq.block_table.append(self._take_free_block().block_id)
        assert len(seq.block_table) == seq.num_blocks, seq
        if not seq.has_pending_token:
            self.hash_filled_block(seq, seq.num_tokens - 1)

    def hash_filled_block(self, seq: Sequence, position: int) -> None:
        """If the token at `position` completes a block of known tokens, register that block's hash.

        Called when a token's value becomes known: before its decode step, or, with overlap
        scheduling, when the sampled value is read back.
        """
        if not self.enable_prefix_caching:
            return
        if (position + 1) % self.block_size or position + 1 > seq.num_tokens:
            return
        i = position // self.block_size
        if i >= len(seq.block_table):
            return
        block = self.blocks[seq.block_table[i]]
        prev = seq.block_table[i - 1] if i > 0 else None
        # A released previous block keeps no hash here: the chain stops (nothing is hashed wrongly).
        prev_hash = self.blocks[prev].hash if prev is not None and prev != FREED_BLOCK else None
        if block.hash is None and (i == 0 or prev_hash is not None):
            token_ids = seq.block(i)
            self._register(block, self._block_hash(seq, i, prev_hash), token_ids)

    def most_blocks_held(self, num_tokens: int, chunk: int) -> int:
        """The most blocks one sequence of `num_tokens` tokens holds at once: all of them, or with a
        sliding window (prefill allocated chunk by chunk, at most `chunk` new tokens a step) those
        spanning the W - 1 keys before a step's first query and its C new tokens: at most
        (W + C - 1) / block_size + 2, one more kept for the hash chain."""
        blocks = self._blocks_for(num_tokens)
        if self.sliding_window is None:
            return blocks
        chunk = min(chunk, num_tokens)
        return min(blocks, (self.sliding_window + chunk - 1) // self.block_size + 3)

    def free_outside_window(self, seq: Sequence) -> int:
        """Release the blocks of `seq` that lie wholly before the window of its next query (at position
        `seq.num_computed_tokens`; later queries see later keys only). The last two blocks of the table
        are kept (the newest block's hash chains to the one before it). Returns how many were released."""
        if self.sliding_window is None:
            return 0
        first_needed = seq.num_computed_tokens - self.sliding_window + 1  # oldest key still visible
        end = min(first_needed // self.block_size, len(seq.block_table) - 2)
        released = 0
        for i in range(end - 1, -1, -1):  # newest first; stop at the ones released before
            block_id = seq.block_table[i]
            if block_id == FREED_BLOCK:
                break
            self._release(block_id)
            seq.block_table[i] = FREED_BLOCK
            released += 1
        return released

    def forget_unfilled_block(self, seq: Sequence) -> None:
        """Undo `may_append`'s hashing of the block `seq`'s newest token completes, for a decode step
        that never ran (that token's K/V was not written)."""
        if seq.num_tokens % self.block_size or len(seq.block_table) < seq.num_blocks:
            return
        block = self.blocks[seq.block_table[seq.num_blocks - 1]]
        if block.ref_count == 1:
            self._forget_hash(block)

    def check_integrity(self) -> None:
        """Raise AssertionError if the free/used sets, reference counts or hash map disagree."""
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        assert not free & self.used_block_ids, "a block is both free and used"
        assert free | self.used_block_ids == set(range(self.num_blocks)), "a block is neither free nor used"
        for block in self.blocks:
            if block.block_id in free:
                assert block.ref_count == 0, block
            else:
                assert block.ref_count > 0, block
            if block.hash is not None:
                assert len(block.token_ids) == self.block_size, block
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h, (h, self.blocks[block_id])
