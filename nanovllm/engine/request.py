"""Engine-side state of one request: its completions' text, stop strings, log-probabilities and outputs.

A request holds `SamplingParams.n` completions. The first is the sequence the prompt was queued as;
the others are forked off it by the scheduler once the prompt is prefilled, so they appear later.
"""

from nanovllm.engine.detokenizer import IncrementalDetokenizer, find_stop
from nanovllm.engine.model_runner import TokenLogprobs
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from nanovllm.sampling_params import SamplingParams


class Completion:
    """One completion's text as its tokens arrive: detokenized incrementally for stop strings and
    streaming, cut at a stop string, with its log-probabilities."""

    def __init__(self, index: int, seq: Sequence, tokenizer, params: SamplingParams):
        self.index = index
        self.seq = seq
        self.tokenizer = tokenizer
        self.params = params
        self.stops = params.stop or []
        decode_kwargs = {"skip_special_tokens": params.skip_special_tokens}
        self.detokenizer = IncrementalDetokenizer(tokenizer, **decode_kwargs)
        self.decode_kwargs = decode_kwargs
        self.num_seen = 0  # completion tokens given to the detokenizer
        self.stop_text: str | None = None  # the text cut at a stop string, once one matched
        self.stop_string: str | None = None
        self.logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        self.sent_tokens = 0  # streaming: completion tokens already yielded
        self.sent_text = 0  # streaming: characters already yielded
        self.matcher = None  # structured outputs: the grammar state after the tokens accepted so far
        self.keeps_last_token_text = False  # ended by the grammar on a content token, not a stop token

    def known_tokens(self) -> list[int]:
        """Completion token ids without a trailing token still being sampled."""
        ids = self.seq.completion_token_ids
        while ids and ids[-1] == PLACEHOLDER_TOKEN:
            ids = ids[:-1]
        return ids

    def _text_tokens(self) -> list[int]:
        """The completion tokens that make its text: a final EOS or stop token is left out (unless
        `include_stop_str_in_output`), as in vLLM."""
        ids = self.known_tokens()
        seq = self.seq
        stopped_by_token = (
            seq.is_finished and seq.finish_reason == "stop" and self.stop_string is None and ids
        )
        if stopped_by_token and not self.params.include_stop_str_in_output and not self.keeps_last_token_text:
            ids = ids[:-1]
        return ids

    def _advance_text(self, final: bool) -> None:
        ids = self._text_tokens()
        if self.num_seen < len(ids) or final:
            self.detokenizer.add(ids[self.num_seen :], final=final)
            self.num_seen = len(ids)

    def _follow_grammar(self, index: int, scheduler) -> None:
        """Advance the matcher over the token at `index`; finish the completion when the grammar is
        complete (its stop token accepted) or, should the token break it, just before that token."""
        if self.matcher.is_terminated():
            return
        seq = self.seq
        if not self.matcher.accept_token(seq.token_ids[index]):
            # Only possible where other settings forbid every token the grammar allows (e.g. min_tokens
            # banning the EOS the completed grammar needs): end the completion before the token.
            self.keeps_last_token_text = True
            if seq.is_finished:
                seq.truncate(index)
            else:
                scheduler.stop_early(seq, index, "stop")
            seq.finish_reason = "stop"
        elif self.matcher.is_terminated() and not seq.is_finished:
            scheduler.stop_early(seq, index + 1, "stop")

    def on_token(self, index: int, scheduler) -> None:
        """A sampled token was filled in at `index` of the sequence: advance the grammar, look for stop
        strings."""
        if self.matcher is not None:
            self._follow_grammar(index, scheduler)
        if not self.stops or self.stop_text is not None:
            return
        before = len(self.detokenizer.text)
        # Stop strings are searched in released text; hold nothing back once the sequence is done.
        # Tokens are filled in order, so every known completion token ends at `index`.
        self._advance_text(final=self.seq.is_finished)
        if index + 1 - self.seq.num_prompt_tokens < self.params.min_tokens:
            return  # no stop string ends a completion shorter than min_tokens (nor matches later)
        found = find_stop(self.detokenizer.text, self.stops, before)
        if found is not None:
            cut, stop = found
            if self.params.include_stop_str_in_output:
                cut += len(stop)
            self.stop_text = self.detokenizer.text[:cut]
            self.stop_string = stop
            if not self.seq.is_finished:
                scheduler.stop_early(self.seq, index + 1, "stop")
            else:
                self.seq.finish_reason = "stop"

    def add_logprobs(self, row: TokenLogprobs) -> None:
        tokenizer = self.tokenizer if self.params.detokenize else None
        # The batch's top-k used its largest N: keep this request's own.
        self.logprobs.append(logprob_dict(row, tokenizer, self.params.logprobs))
        self.cumulative_logprob += row.logprob

    def text(self) -> str:
        if not self.params.detokenize:
            return ""
        if self.stop_text is not None:
            return self.stop_text
        return self.tokenizer.decode(self._text_tokens(), **self.decode_kwargs)

    def output(self) -> CompletionOutput:
        seq = self.seq
        token_ids = self.known_tokens()
        asked = self.params.logprobs is not None
        return CompletionOutput(
            index=self.index,
            text=self.text(),
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob if asked else None,
            logprobs=self.logprobs[: len(token_ids)] if asked else None,
            finish_reason=seq.finish_reason if seq.is_finished else None,
            stop_reason=self.stop_string if self.stop_string is not None else seq.stop_reason,
        )

    def delta(self) -> dict | None:
        """What is new since the last delta (streaming), or None if nothing is."""
        finished = self.seq.is_finished
        if not self.params.detokenize:
            text = ""
        elif self.stop_text is not None:
            text = self.stop_text
        else:
            self._advance_text(final=finished)
            text = self.detokenizer.text
            if self.stops and not finished:
                # Hold back what could be the start of a stop string still being generated.
                hold = max(len(stop) for stop in self.stops) - 1
                text = text[: max(self.sent_text, len(text) - hold)]
        new_tokens = self.known_tokens()[self.sent_tokens :]
        new_text = text[self.sent_text :]
        if not new_tokens and not new_text and not finished:
            return None
        self.sent_tokens += len(new_tokens)
        self.sent_text = len(text)
        return {
            "completion": self.index,
            "text": new_text,
            "token_ids": new_tokens,
            "finished": finished,
            "finish_reason": self.seq.finish_reason if finished else None,
        }


def logprob_dict(row: TokenLogprobs, tokenizer, num_top: int | None = None) -> dict[int, Logprob]:
    """{token id: Logprob} for the chosen token and the `num_top` most likely (all of `row`'s when None;
    the chosen token first)."""

    def text(token: int) -> str | None:
        return None if tokenizer is None else tokenizer.decode([token])

    entries = {row.token: Logprob(row.logprob, row.rank, text(row.token))}
    top = slice(None) if num_top is None else slice(num_top)
    for rank, (token, lp) in enumerate(zip(row.top_ids[top], row.top_logprobs[top]), start=1):
        if token not in entries:
            entries[token] = Logprob(lp, rank, text(token))
    return entries


class Request:
    """One prompt's request: `n` completions, who is waiting for it (`owner`), its prompt logprobs."""

    def __init__(
        self,
        key: int,
        request_id: str,
        seq: Sequence,
        prompt: str | None,
        params: SamplingParams,
        tokenizer,
        owner,
        index: int | None = None,
    ):
        self.key = key  # the first sequence's id: the original API's request id
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(seq.token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.owner = owner
        self.index = index
        self.completions = [Completion(0, seq, tokenizer, params)]
        self.grammar = self.new_matcher = None  # structured outputs (set_grammar)
        self.num_cached_tokens = 0
        # Prompt log-probabilities arrive chunk by chunk; the first position has none.
        self.prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_launched = 1  # entries of prompt_logprobs a launched step will have filled

    def set_grammar(self, grammar, new_matcher) -> None:
        """Structured outputs: every completion follows `grammar` with a matcher of its own."""
        self.grammar, self.new_matcher = grammar, new_matcher
        self.completions[0].matcher = new_matcher(grammar)

    def add_completion(self, seq: Sequence) -> Completion:
        completion = Completion(len(self.completions), seq, self.tokenizer, seq.params)
        if self.grammar is not None:
            completion.matcher = self.new_matcher(self.grammar)
        self.completions.append(completion)
        return completion

    @property
    def finished(self) -> bool:
        """Every completion is done (forks still to come count as unfinished)."""
        first = self.completions[0].seq
        if first.num_pending_forks:
            return False
        if len(self.completions) == 1:  # the common case, checked for every request every step
            return first.is_finished
        return all(c.seq.is_finished for c in self.completions)

    def add_prompt_logprobs(self, rows: list[TokenLogprobs]) -> None:
        tokenizer = self.tokenizer if self.params.detokenize else None
        self.prompt_logprobs.extend(logprob_dict(row, tokenizer) for row in rows)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[c.output() for c in self.completions],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            index=self.index,
        )
