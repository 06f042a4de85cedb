"""Per-request logit adjustments (penalties, min_tokens, logit_bias, allowed_token_ids, bad_words),
applied to the batch on the device before the sampler.

Slots. A sequence that needs any of these gets a slot the first time `prepare` sees it and keeps it until
`release`. A slot is one row of each per-sequence device tensor, built once when the slot is given out:
- `bias` [slots, vocab] float32: logit_bias added, -inf outside allowed_token_ids and on every
  single-token bad word (zeros for a sequence with none of these);
- `counts` [slots, vocab] int32: how often each token is in the completion so far, started from the
  sequence's known completion tokens (placeholders skipped) and advanced by `record` on the device;
- `prompt` [slots, vocab] bool: which tokens are in the prompt (for repetition_penalty);
- `penalties` [slots, 3] float32: repetition, frequency and presence penalty (1, 0, 0 when off).
Each tensor is allocated only when some sequence needs it; all grow together by doubling up to
`max_rows` slots, and released slots are reused (their rows are cleared when given out again).

Each step `prepare` builds, on the host, the list of rows that need processing, their slots, and a short
list of (row, token) pairs banned this step only: EOS and the row's stop_token_ids while the completion is
shorter than min_tokens, and the last token of every multi-token bad word whose other tokens end the
completion (this needs the sequence's tokens on the host: see `needs_host_tokens`). `apply` then does
one batched set of tensor ops on those rows; other rows are left exactly as they were.

Order (vLLM v1's): allowed_token_ids, bad words, min_tokens, logit_bias, then repetition penalty (tokens
in the prompt or completion: logit / p if positive, else logit * p), frequency penalty (logit -= f *
count in the completion), presence penalty (logit -= p if the token is in the completion). The first four
only add finite values or -inf, so they are one addition of the slot's bias row plus the step's bans.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.sampling_params import SamplingParams

# Slots of the first allocation; doubled (up to max_rows) whenever more sequences need state at once.
INITIAL_SLOTS = 16
_NEG_INF = float("-inf")


@dataclass(slots=True)
class ProcessorBatch:
    """One step's plan, made by `LogitsProcessors.prepare`: which rows are processed and how."""

    num_rows: int  # rows of the logits (every sampling row of the step)
    rows: torch.Tensor | None  # [n] int64: the rows processed; None when every row is
    slots: torch.Tensor  # [n] int64: each processed row's slot
    banned: torch.Tensor | None  # [2, m] int64: (index into the processed rows, token) set to -inf
    use_bias: bool  # some processed row has a bias row (logit_bias, allowed_token_ids, bad words)
    use_penalties: bool  # some processed row has a penalty (its output counts are recorded)


@dataclass(slots=True)
class _SlotState:
    """What the host keeps about one sequence's slot."""

    slot: int
    has_bias: bool
    has_penalties: bool
    min_tokens: int
    min_tokens_ban: list[int]  # EOS ids and stop_token_ids, banned while the completion is shorter
    single_token_words: list[int]  # bad words of one token: always banned (in the bias row)
    multi_token_words: list[list[int]]  # bad words of two or more tokens: banned step by step


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """ValueError naming the field when allowed_token_ids or logit_bias holds an id outside the
    vocabulary (the engine can call this when a request is added)."""
    if params.allowed_token_ids is not None and max(params.allowed_token_ids) >= vocab_size:
        raise ValueError(
            f"SamplingParams.allowed_token_ids has the id {max(params.allowed_token_ids)}, outside the "
            f"vocabulary of {vocab_size} tokens"
        )
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(
            f"SamplingParams.logit_bias has the id {max(params.logit_bias)}, outside the vocabulary of "
            f"{vocab_size} tokens"
        )


def bad_words_token_ids(words: Iterable[str], tokenizer, vocab_size: int) -> list[list[int]]:
    """The token sequences that `bad_words` forbids, by vLLM's rule: each word (leading spaces stripped)
    as tokenized alone, and also with one leading space when that gives a different first token and
    the same number of tokens (the word in the middle of a text)."""
    result = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise ValueError(f"SamplingParams.bad_words: {word!r} tokenizes to no tokens")
        result.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            result.append(spaced)
    outside = [t for ids in result for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"SamplingParams.bad_words tokenize to ids outside the vocabulary: {outside}")
    return result


class LogitsProcessors:
    """Per-sequence logit adjustments for one model runner (rank 0): `prepare` on the host before the
    forward, `apply` to the logits, the sampler, then `record` with the sampled tokens. A sequence's
    SamplingParams are read when it gets its slot; changing them later is not seen."""

    def __init__(self, vocab_size: int, device: torch.device, max_rows: int, tokenizer=None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.tokenizer = tokenizer
        self.capacity = 0  # slots allocated on the device
        self._free: list[int] = []  # slots below `capacity` not held by a sequence
        self._states: dict[int, _SlotState] = {}  # seq_id -> its slot
        self._bias: torch.Tensor | None = None  # [capacity, vocab] float32
        self._counts: torch.Tensor | None = None  # [capacity, vocab] int32
        self._prompt: torch.Tensor | None = None  # [capacity, vocab] bool
        self._penalties: torch.Tensor | None = None  # [capacity, 3] float32: repetition, frequency, presence
        self._ones: torch.Tensor | None = None  # [max_rows] int32, the increments of `record`

    # ---- host side -------------------------------------------------------------------------------

    def needs_host_tokens(self, params: SamplingParams) -> bool:
        """Whether `prepare` must see this request's completion tokens (no placeholders): it has a bad
        word of more than one token. The engine then waits for each step's token before the next."""
        if not params.bad_words:
            return False
        return any(len(ids) > 1 for ids in self._bad_words(params))

    def prepare(self, seqs: list[Sequence], stop_ids: frozenset[int]) -> ProcessorBatch | None:
        """Host side, once per step, before the forward: `seqs[i]` is the sequence whose next token row i
        samples, `stop_ids` the model's EOS ids. None when no row needs processing."""
        rows: list[int] = []
        slots: list[int] = []
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        new: list[tuple[Sequence, _SlotState]] = []
        use_bias = use_penalties = False
        try:
            for i, seq in enumerate(seqs):
                if not seq.params.needs_logits_processing:
                    continue
                state = self._states.get(seq.seq_id)
                if state is None:
                    state = self._new_state(seq, stop_ids)
                    new.append((seq, state))
                j = len(rows)
                rows.append(i)
                slots.append(state.slot)
                use_bias |= state.has_bias
                use_penalties |= state.has_penalties
                if seq.num_completion_tokens < state.min_tokens:
                    ban_rows += [j] * len(state.min_tokens_ban)
                    ban_tokens += state.min_tokens_ban
                if state.multi_token_words:
                    completing = _completing_tokens(seq, state.multi_token_words)
                    ban_rows += [j] * len(completing)
                    ban_tokens += completing
            if new:
                self._build(new)
        except Exception:
            self.release([seq.seq_id for seq, _ in new])  # no half-built slot stays held
            raise
        if not rows:
            return None
        n, m = len(rows), len(ban_rows)
        packed = torch.tensor(rows + slots + ban_rows + ban_tokens, dtype=torch.int64, device=self.device)
        return ProcessorBatch(
            num_rows=len(seqs),
            rows=None if n == len(seqs) else packed[:n],
            slots=packed[n : 2 * n],
            banned=packed[2 * n :].view(2, m) if m else None,  # [2, m]
            use_bias=use_bias,
            use_penalties=use_penalties,
        )

    def release(self, seq_ids: Iterable[int]) -> None:
        """Forget finished, aborted (or preempted) sequences' state and free their slots. A sequence seen
        again later gets a new slot built from its tokens then."""
        for seq_id in seq_ids:
            state = self._states.pop(seq_id, None)
            if state is not None:
                self._free.append(state.slot)

    def check_integrity(self) -> None:
        """Every allocated slot is either free or held by exactly one sequence."""
        held = [s.slot for s in self._states.values()]
        if sorted(held + self._free) != list(range(self.capacity)):
            raise RuntimeError(f"slots held {sorted(held)} and free {sorted(self._free)} of {self.capacity}")

    @property
    def num_held(self) -> int:
        return len(self._states)

    def _bad_words(self, params: SamplingParams) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs the tokenizer: LogitsProcessors(tokenizer=...)")
        return bad_words_token_ids(params.bad_words, self.tokenizer, self.vocab_size)

    def _new_state(self, seq: Sequence, stop_ids: frozenset[int]) -> _SlotState:
        params = seq.params
        check_vocab(params, self.vocab_size)
        words = self._bad_words(params) if params.bad_words else []
        single = [ids[0] for ids in words if len(ids) == 1]
        ban = sorted({t for t in (*stop_ids, *(params.stop_token_ids or ())) if t < self.vocab_size})
        state = _SlotState(
            slot=self._take_slot(),
            has_bias=bool(params.logit_bias) or params.allowed_token_ids is not None or bool(single),
            has_penalties=params.needs_penalties,
            min_tokens=params.min_tokens,
            min_tokens_ban=ban,
            single_token_words=single,
            multi_token_words=[ids for ids in words if len(ids) > 1],
        )
        self._states[seq.seq_id] = state
        return state

    def _take_slot(self) -> int:
        if not self._free:
            if self.capacity >= self.max_rows:
                raise RuntimeError(
                    f"more than max_rows={self.max_rows} sequences hold logits-processing state: release "
                    "finished, aborted or preempted sequences"
                )
            self._grow(min(self.max_rows, max(INITIAL_SLOTS, 2 * self.capacity)))
        return self._free.pop()

    # ---- device side -----------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        """Reallocate every allocated tensor with `capacity` slots (the new rows zero / neutral)."""
        old = self.capacity
        for name in ("_bias", "_counts", "_prompt", "_penalties"):
            tensor = getattr(self, name)
            if tensor is not None:
                grown = self._allocate(name, capacity)
                grown[:old] = tensor
                setattr(self, name, grown)
        self._free.extend(range(capacity - 1, old - 1, -1))  # popped lowest first
        self.capacity = capacity

    def _allocate(self, name: str, capacity: int) -> torch.Tensor:
        vocab, device = self.vocab_size, self.device
        if name == "_bias":
            return torch.zeros(capacity, vocab, dtype=torch.float32, device=device)
        if name == "_counts":
            return torch.zeros(capacity, vocab, dtype=torch.int32, device=device)
        if name == "_prompt":
            return torch.zeros(capacity, vocab, dtype=torch.bool, device=device)
        neutral = torch.tensor([1.0, 0.0, 0.0], device=device)  # repetition 1, frequency 0, presence 0
        return neutral.repeat(capacity, 1)  # [capacity, 3]

    def _build(self, new: list[tuple[Sequence, _SlotState]]) -> None:
        """Fill the device rows of newly given-out slots, a few batched ops for all of them."""
        if self._bias is None and any(s.has_bias for _, s in new):
            self._bias = self._allocate("_bias", self.capacity)
        if self._counts is None and any(s.has_penalties for _, s in new):
            self._counts = self._allocate("_counts", self.capacity)
            self._prompt = self._allocate("_prompt", self.capacity)
            self._penalties = self._allocate("_penalties", self.capacity)
            self._ones = torch.ones(self.max_rows, dtype=torch.int32, device=self.device)
        new_slots = self._index([s.slot for _, s in new])
        if self._bias is not None:
            self._fill_bias(new, new_slots)
        if self._counts is not None:
            self._fill_penalties(new, new_slots)

    def _fill_bias(self, new: list[tuple[Sequence, _SlotState]], new_slots: torch.Tensor) -> None:
        bias = self._bias
        bias[new_slots] = 0.0
        allowed_slots, allowed, banned, biased, values = [], [], [], [], []
        for seq, state in new:
            params = seq.params
            if params.allowed_token_ids is not None:
                allowed_slots.append(state.slot)
                allowed += [(state.slot, t) for t in params.allowed_token_ids]
            banned += [(state.slot, t) for t in state.single_token_words]
            if params.logit_bias:
                biased += [(state.slot, t) for t in params.logit_bias]
                values += list(params.logit_bias.values())
        if allowed_slots:
            bias[self._index(allowed_slots)] = _NEG_INF
            bias[self._pairs(allowed)] = 0.0
        if banned:
            bias[self._pairs(banned)] = _NEG_INF
        if biased:  # -inf (not allowed, bad word) + bias stays -inf
            values_t = torch.tensor(values, dtype=torch.float32, device=self.device)
            bias.index_put_(self._pairs(biased), values_t, accumulate=True)

    def _fill_penalties(self, new: list[tuple[Sequence, _SlotState]], new_slots: torch.Tensor) -> None:
        self._counts[new_slots] = 0
        self._prompt[new_slots] = False
        seen, prompt, values = [], [], []
        for seq, state in new:
            params = seq.params
            values.append((params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
            if state.has_penalties:
                done = [t for t in seq.completion_token_ids if t != PLACEHOLDER_TOKEN]
                seen += [(state.slot, t) for t in done]
                prompt += [(state.slot, t) for t in seq.prompt_token_ids]
        self._penalties[new_slots] = torch.tensor(values, dtype=torch.float32, device=self.device)
        if seen:
            pairs = self._pairs(seen)
            self._counts.index_put_(pairs, self._ones[:1].expand(len(seen)), accumulate=True)
        if prompt:
            self._prompt[self._pairs(prompt)] = True

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _pairs(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.tensor(pairs, dtype=torch.int64, device=self.device)  # [len, 2]
        return both[:, 0], both[:, 1]

    def apply(self, logits: torch.Tensor, batch: ProcessorBatch) -> torch.Tensor:
        """logits [num_rows, vocab] (any float dtype, on the device) -> adjusted float32 logits, same shape;
        the input is not modified."""
        if logits.shape != (batch.num_rows, self.vocab_size):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)}, expected ({batch.num_rows}, {self.vocab_size})"
            )
        out = logits.to(torch.float32, copy=True)  # [num_rows, vocab]
        x = out if batch.rows is None else out[batch.rows]  # [n, vocab]
        if batch.use_bias:
            x = x + self._bias[batch.slots]
        if batch.banned is not None:
            x[batch.banned[0], batch.banned[1]] = _NEG_INF
        if batch.use_penalties:
            counts = self._counts[batch.slots]  # [n, vocab]
            in_output = counts > 0
            rep, freq, pres = self._penalties[batch.slots].unsqueeze(2).unbind(1)  # each [n, 1]
            repeated = in_output | self._prompt[batch.slots]
            x = torch.where(repeated, torch.where(x > 0, x / rep, x * rep), x)
            x = x - freq * counts.to(torch.float32)
            x = x - pres * in_output.to(torch.float32)
        if batch.rows is None:
            return x
        out[batch.rows] = x
        return out

    def record(self, batch: ProcessorBatch, tokens: torch.Tensor) -> None:
        """After the draw: tokens [num_rows] int64 on the device join the processed rows' output counts,
        on the device (the host need not know them yet)."""
        if not batch.use_penalties:
            return
        drawn = tokens if batch.rows is None else tokens[batch.rows]  # [n]
        n = batch.slots.shape[0]
        self._counts.index_put_((batch.slots, drawn), self._ones[:n], accumulate=True)


def _completing_tokens(seq: Sequence, words: list[list[int]]) -> list[int]:
    """The last token of each multi-token bad word whose other tokens end the completion."""
    out = []
    for ids in words:
        k = len(ids) - 1
        if k > seq.num_completion_tokens:
            continue
        tail = seq.token_ids[-k:]
        if PLACEHOLDER_TOKEN in tail:
            raise RuntimeError(
                f"sequence {seq.seq_id} has multi-token bad words and a token still on the device: the "
                "engine must wait for its tokens (LogitsProcessors.needs_host_tokens)"
            )
        if tail == ids[:-1]:
            out.append(ids[-1])
    return out
