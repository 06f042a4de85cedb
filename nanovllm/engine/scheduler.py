"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from collections import deque
from dataclasses import dataclass
from typing import Literal

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work. For prefill, `num_new_tokens[i]` prompt tokens of `seqs[i]` are computed
    (a chunk when fewer than its uncomputed tokens); for decode it is 1 for every sequence."""

    phase: Literal["prefill", "decode"]
    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def is_prefill(self) -> bool:
        return self.phase == "prefill"

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Prefill-first scheduling with chunked prefill, LIFO preemption and prefix caching."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, eos: int | None,
                 block_manager: BlockManager, max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos = eos
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Pick the next step. Waiting prompts go first (in arrival order); decode runs only when no
        prompt can start. Only the first sequence of a prefill batch may be chunked."""
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self.max_num_batched_tokens
        for seq in self.waiting:
            if len(seqs) == self.max_num_seqs or budget == 0:
                break
            if not seq.block_table:  # not started: needs blocks for the whole sequence
                if not self.block_manager.can_allocate(seq):
                    break
                # Cache hits shrink the tokens to compute: count them before taking blocks.
                remaining = seq.num_tokens - self.block_manager.num_cached_tokens(seq)
                if remaining > budget and seqs:
                    break
                self.block_manager.allocate(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > budget and seqs:  # only the first sequence may be chunked
                break
            take = min(remaining, budget)
            seqs.append(seq)
            num_new.append(take)
            budget -= take
        if seqs:
            for seq, n in zip(seqs, num_new):
                if seq.num_computed_tokens + n == seq.num_tokens:  # whole prompt done this step
                    self.waiting.remove(seq)
                    seq.status = SequenceStatus.RUNNING
                    self.running.append(seq)
            return ScheduledBatch("prefill", seqs, num_new)

        while self.running and len(seqs) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())  # the most recently admitted one
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seqs.append(seq)
        if not seqs:
            raise RuntimeError("scheduler has no sequence to run although requests are pending")
        self.running.extendleft(reversed(seqs))
        return ScheduledBatch("decode", seqs, [1] * len(seqs))

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and put it back at the front of the queue to be recomputed."""
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Record a finished step: advance computed tokens, append sampled tokens, finish sequences.

        `token_ids[i]` is the token sampled for `batch.seqs[i]`, or None for a prefill chunk that
        did not reach the end of its sequence. Returns the sequences that finished.
        """
        finished = []
        for seq, n, token_id in zip(batch.seqs, batch.num_new_tokens, token_ids):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # prefill chunk: more of the prompt to go
            assert token_id is not None, seq
            seq.append_token(token_id)
            if self._should_stop(seq, token_id):
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _should_stop(self, seq: Sequence, token_id: int) -> bool:
        if not seq.ignore_eos and self.eos is not None and token_id == self.eos:
            return True
        return seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence and free its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
