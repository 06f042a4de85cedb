"""Continuous batching: which sequences run in the next step, and how many tokens each."""

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work. For prefill, `num_new_tokens[i]` prompt tokens of `seqs[i]` are computed
    (a chunk when fewer than its uncomputed tokens); for decode it is 1 for every sequence."""

    phase: Literal["prefill", "decode"]
    seqs: list[Sequence]
    num_new_tokens: list[int]
    # SamplingParams.n > 1: (row of the parent in `seqs`, new sequence) for each completion forked off a
    # prompt this step completes. A fork computes nothing: it samples its first token from its parent's
    # logits, and `block_copies` (source, destination) copy the K/V of each parent's partly filled last
    # block into the fork's own block after the step's forward.
    forks: list[tuple[int, Sequence]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Rows of `seqs` whose prompt log-probabilities are wanted (set by the engine before launch).
    prompt_logprob_rows: list[int] = field(default_factory=list)

    @property
    def rows(self) -> list[Sequence]:
        """The sequences that get one sampled token each, in row order: `seqs`, then the forks."""
        if not self.forks:
            return self.seqs
        return self.seqs + [child for _, child in self.forks]

    @property
    def logit_rows(self) -> list[int]:
        """For each row of `rows`, the row of `seqs` whose logits it samples from."""
        return list(range(len(self.seqs))) + [parent for parent, _ in self.forks]

    @property
    def is_prefill(self) -> bool:
        return self.phase == "prefill"

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass(slots=True)
class LaunchedBatch:
    """A batch whose model step has been started: `sampling[i]` is the index in `batch.rows[i].token_ids`
    where its sampled token goes, or None for a prefill chunk that samples nothing."""

    batch: ScheduledBatch
    sampling: list[int | None]
    # Filled by Scheduler.finalize: (sequence, index) of every sampled token it took.
    accepted: list[tuple[Sequence, int]] = field(default_factory=list)


class Scheduler:
    """Prefill-first scheduling with chunked prefill, LIFO preemption and prefix caching."""

    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        eos: int | Iterable[int] | None,
        block_manager: BlockManager,
        max_model_len: int,
        seq_ids: Iterator[int] | None = None,
        fork_params: Callable[[Sequence, int], object] | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # The end-of-sequence ids (the tokenizer's and generation_config.json's).
        self.eos_ids: frozenset[int] = frozenset(
            () if eos is None else (eos,) if isinstance(eos, int) else eos
        )
        # Ids for forked completions, and their sampling parameters (completion i of the parent's).
        self.seq_ids = seq_ids if seq_ids is not None else itertools.count(1 << 40)
        self.fork_params = fork_params or (lambda parent, i: parent.params)
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """The next step; RuntimeError if requests are pending but none can run."""
        batch = self.try_schedule()
        if batch is None:
            raise RuntimeError("scheduler has no sequence to run although requests are pending")
        return batch

    def try_schedule(self) -> ScheduledBatch | None:
        """Pick the next step, or None if nothing can run now. Waiting prompts go first (in arrival
        order); decode runs only when no prompt can start. Only the first sequence of a prefill
        batch may be chunked."""
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        batch, preempted = self._schedule_decode()
        if batch is None and preempted:
            # Nothing decodes: the sequences short of a block were preempted, the last one by itself.
            # The blocks they freed may let a waiting prompt run now (with a sliding window, a started
            # one whose next chunk found too few free blocks); without overlap scheduling no step is in
            # flight whose read-back would give the engine a second try.
            batch = self._schedule_prefill()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        """A batch of waiting prompts (or chunks of them), or None if none can start."""
        seqs: list[Sequence] = []
        num_new: list[int] = []
        forks: list[tuple[int, Sequence]] = []
        copies: list[tuple[int, int]] = []
        budget = self.max_num_batched_tokens
        # Sliding window in every layer: blocks are taken chunk by chunk and released behind the window,
        # so a prompt longer than the cache still runs. A prompt already started goes first (it holds
        # blocks that a waiting one may need).
        lazy = self.block_manager.sliding_window is not None
        waiting = sorted(self.waiting, key=lambda s: not s.block_table) if lazy else self.waiting
        for seq in waiting:
            if len(seqs) == self.max_num_seqs or budget == 0 or seq.has_pending_token:
                break
            if not seq.block_table:  # not started: needs blocks for the whole sequence
                # Looked up once for all three calls (its block hashes are memoised on the sequence).
                hits = self.block_manager.prefix_hits(seq)
                # Cache hits shrink the tokens to compute: count them before taking blocks.
                cached = self.block_manager.num_cached_tokens(seq, hits)
                upto = cached + min(seq.num_tokens - cached, budget) if lazy else None
                if not self.block_manager.can_allocate(seq, hits, upto):
                    break
                if seq.num_tokens - cached > budget and seqs:
                    break
                self.block_manager.allocate(seq, hits, upto)
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > budget and seqs:  # only the first sequence may be chunked
                break
            take = min(remaining, budget)
            if lazy and not self.block_manager.extend(seq, seq.num_computed_tokens + take):
                break
            if take == remaining and seq.num_pending_forks:
                if not self._can_fork(seq):
                    break
                forks += [(len(seqs), child) for child in self._fork(seq, copies)]
            seqs.append(seq)
            num_new.append(take)
            budget -= take
        if seqs:
            for seq, n in zip(seqs, num_new):
                if seq.num_computed_tokens + n == seq.num_tokens:  # whole prompt done this step
                    self.waiting.remove(seq)
                    seq.status = SequenceStatus.RUNNING
                    self.running.append(seq)
            return ScheduledBatch("prefill", seqs, num_new, forks, copies)
        return None

    def _schedule_decode(self) -> tuple[ScheduledBatch | None, bool]:
        """A decode step of running sequences (or None), preempting the most recently admitted ones
        while blocks run short; and whether any was preempted."""
        seqs: list[Sequence] = []
        preempted = False
        finishing: list[Sequence] = []  # their in-flight token is their last: nothing more to run
        # A sequence whose sampler needs its previous token on the host (a grammar's mask, multi-token
        # bad words) sits out a step while that token is in flight: the others keep overlapping.
        held: list[Sequence] = []
        while self.running and len(seqs) < self.max_num_seqs:
            seq = self.running.popleft()
            if self.will_finish(seq):
                finishing.append(seq)
                continue
            if seq.needs_host_tokens and seq.has_pending_token:
                held.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                preempted = True
                if self.running:
                    self.preempt(self.running.pop())  # the most recently admitted one
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seqs.append(seq)
        self.running.extendleft(reversed(seqs + finishing + held))
        if not seqs:
            return None, preempted
        return ScheduledBatch("decode", seqs, [1] * len(seqs)), preempted

    def _can_fork(self, seq: Sequence) -> bool:
        """Whether the forks of `seq` get the blocks they need now (a partly filled last block each)."""
        partial = seq.num_tokens % self.block_manager.block_size != 0
        return not partial or self.block_manager.num_free_blocks >= seq.num_pending_forks

    def _fork(self, seq: Sequence, copies: list[tuple[int, int]]) -> list[Sequence]:
        """The completions 1..n-1 of `seq`'s request, sharing its prompt blocks."""
        children = []
        for i in range(1, seq.num_pending_forks + 1):
            child = seq.fork(next(self.seq_ids), self.fork_params(seq, i))
            copy = self.block_manager.fork(seq, child)
            if copy is not None:
                copies.append(copy)
            children.append(child)
        seq.num_pending_forks = 0
        return children

    def unschedule(self, batch: ScheduledBatch) -> None:
        """Undo scheduling a batch whose launch failed. A prefill batch moved the prompts it completes
        to the running queue, where they would decode with K/V never computed: put them back at the
        front of the waiting queue, in order (they keep their blocks)."""
        if not batch.is_prefill:
            # may_append hashed the blocks these steps' tokens would complete: their last slot was
            # never written, so they must not be served from the prefix cache.
            for seq in batch.seqs:
                self.block_manager.forget_unfilled_block(seq)
            return
        for parent, child in batch.forks:  # the forks never started: their parents fork again later
            self.block_manager.deallocate(child)
            batch.seqs[parent].num_pending_forks += 1
        for seq in reversed(batch.seqs):
            if seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
                seq.status = SequenceStatus.WAITING
                self.waiting.appendleft(seq)

    def will_finish(self, seq: Sequence) -> bool:
        """Whether `seq` stops at its newest token whatever its value (max_tokens, max_model_len)."""
        return seq.num_completion_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len

    def has_unlaunched_work(self) -> bool:
        """Whether anything beyond what is in flight could still run."""
        return bool(self.waiting) or any(not self.will_finish(seq) for seq in self.running)

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and put it back at the front of the queue to be recomputed."""
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def on_launched(self, batch: ScheduledBatch) -> LaunchedBatch:
        """Record that the model step for `batch` has started: its tokens count as computed and
        every sequence that samples gets a placeholder for the token being sampled."""
        sampling: list[int | None] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            # Sliding windows: blocks before the next query's window are never read again. The step
            # that read them is launched, and later writes to a reused block run after it on the device.
            self.block_manager.free_outside_window(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                sampling.append(None)  # prefill chunk: more of the prompt to go
            else:
                sampling.append(seq.num_tokens)
                seq.append_token(PLACEHOLDER_TOKEN)
        for _, child in batch.forks:  # their prompt's K/V is their parent's (shared or copied)
            child.num_computed_tokens = child.num_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            sampling.append(child.num_tokens)
            child.append_token(PLACEHOLDER_TOKEN)
        return LaunchedBatch(batch, sampling)

    def finalize(self, launched: LaunchedBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Fill in the sampled tokens of a finished model step and stop the sequences that are done.

        Returns the sequences that finished. A sequence aborted or stopped meanwhile is skipped.
        """
        finished = []
        for seq, index, token_id in zip(launched.batch.rows, launched.sampling, token_ids):
            if index is None or seq.status == SequenceStatus.FINISHED:
                continue
            launched.accepted.append((seq, index))
            assert token_id is not None and seq.token_ids[index] == PLACEHOLDER_TOKEN, seq
            seq.token_ids[index] = token_id
            if index == seq.num_tokens - 1:
                seq.last_token = token_id
            if index < seq.num_computed_tokens:
                # The token's K/V is being computed by a step already launched (overlap): a block it
                # fills may be shared from now on. Otherwise may_append hashes it before its step.
                self.block_manager.hash_filled_block(seq, index)
            if self._should_stop(seq, token_id, index + 1):
                seq.truncate(index + 1)
                self._finish(seq)
                finished.append(seq)
        return finished

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Record a finished step in one go (no overlap): `token_ids[i]` is the token sampled for
        `batch.seqs[i]`, or None for a prefill chunk. Returns the sequences that finished."""
        return self.finalize(self.on_launched(batch), token_ids)

    def _finish(self, seq: Sequence) -> None:
        queue = self.running if seq.status == SequenceStatus.RUNNING else self.waiting
        if seq.status != SequenceStatus.FINISHED and seq in queue:
            queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    def _should_stop(self, seq: Sequence, token_id: int, length: int) -> bool:
        """Whether `seq` stops once its first `length` tokens (ending with `token_id`) exist; sets the
        finish reason."""
        stop_ids = seq.params.stop_token_ids
        if length - seq.num_prompt_tokens >= seq.params.min_tokens:
            if not seq.ignore_eos and token_id in self.eos_ids:
                seq.finish_reason = "stop"
                return True
            if stop_ids and token_id in stop_ids:
                seq.finish_reason = "stop"
                seq.stop_reason = token_id
                return True
        if length - seq.num_prompt_tokens >= seq.max_tokens or length >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def stop_early(self, seq: Sequence, length: int, reason: str) -> None:
        """Finish `seq` keeping its first `length` tokens (e.g. a stop string matched)."""
        seq.truncate(length)
        seq.finish_reason = reason
        self._finish(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence and free its blocks (finish reason "abort")."""
        if seq.status != SequenceStatus.FINISHED:
            seq.finish_reason = "abort"
            seq.num_pending_forks = 0
            self._finish(seq)
