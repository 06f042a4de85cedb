"""The offline engine: tokenizes requests, schedules steps and runs them on the model."""

import atexit
import functools
import itertools
import weakref
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from time import perf_counter

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import make_config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer, find_stop
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.engine.tp import create_model_runner
from nanovllm.models.registry import check_model_config
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]


def _exit_if_alive(engine: "weakref.ref[LLMEngine]") -> None:
    if (alive := engine()) is not None:
        alive.exit()


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        config = make_config(model, kwargs)
        check_model_config(config.hf_config, config.max_model_len)  # refuse unservable models before loading
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True, trust_remote_code=False)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(config.hf_config, "eos_token_id", None)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        config.eos = -1 if eos is None else eos
        self.vocab_size = config.hf_config.vocab_size
        self._exited = False
        self.model_runner = create_model_runner(config)  # workers too when tensor-parallel
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(
            config.max_num_seqs, config.max_num_batched_tokens, eos, self.block_manager, config.max_model_len
        )
        # (LaunchedBatch, StepResult) of launched steps not yet read back, oldest first (at most 2)
        self._inflight: deque = deque()
        self._seq_ids = itertools.count()
        self._requests: dict[int, Request] = {}
        # Exit at interpreter exit. The hook holds the engine weakly: atexit.register(self.exit) would keep
        # an engine dropped without exit(), its weights and its KV cache alive until the interpreter exits.
        self._exit_hook = functools.partial(_exit_if_alive, weakref.ref(self))
        atexit.register(self._exit_hook)

    # ---- lifecycle ---------------------------------------------------------------------------

    def exit(self) -> None:
        """Release the model, the KV cache and any worker; safe to call more than once."""
        if self._exited:
            return
        self._exited = True
        atexit.unregister(self._exit_hook)
        self._inflight.clear()
        self.model_runner.exit()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def _check_alive(self) -> None:
        if self._exited:
            raise RuntimeError("this engine has exited; create a new LLM to generate again")

    # ---- requests ----------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
        else:
            raise TypeError(
                f"a prompt must be a string or a list of token ids (ints), got {type(prompt).__name__}"
            )
        if not token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={self.config.max_model_len}"
            )
        return token_ids

    def _make_sequence(self, prompt: Prompt, sampling_params: SamplingParams) -> Sequence:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        token_ids = self._tokenize(prompt)
        bs = self.config.kvcache_block_size
        longest = min(len(token_ids) + sampling_params.max_tokens, self.config.max_model_len)
        needed = (longest + bs - 1) // bs
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"a request of {len(token_ids)} prompt tokens and max_tokens={sampling_params.max_tokens} "
                f"can need {needed} KV blocks of {bs} tokens, but the cache has only "
                f"{self.block_manager.num_blocks}"
            )
        if sampling_params.logprobs is not None and sampling_params.logprobs > self.vocab_size:
            raise ValueError(
                f"SamplingParams.logprobs={sampling_params.logprobs} is more than the vocabulary "
                f"({self.vocab_size} tokens)"
            )
        return Sequence(next(self._seq_ids), token_ids, sampling_params, bs)

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams) -> int:
        """Queue one request; returns its sequence id."""
        self._check_alive()
        return self._enqueue(self._make_sequence(prompt, sampling_params))

    def _enqueue(self, seq: Sequence) -> int:
        self._requests[seq.seq_id] = Request(seq, self.tokenizer)
        self.scheduler.add(seq)
        return seq.seq_id

    def abort_request(self, seq_id: int) -> None:
        """Drop a queued or running request and free its KV blocks."""
        request = self._requests.pop(seq_id, None)
        if request is None:
            raise ValueError(f"no unfinished request with id {seq_id}")
        self.scheduler.abort(request.seq)

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """Run one step. Returns the requests that finished in it as (seq_id, completion token ids),
        and the tokens processed: positive for a prefill step, minus the batch size for decode.

        With overlap scheduling the step is launched on the GPU and the previous step's tokens are
        read back while it runs, so a request can be reported one call after its last step.
        """
        finished, _, num_tokens = self._step()
        outputs = [(r.seq.seq_id, r.seq.completion_token_ids) for r in finished]
        return outputs, num_tokens

    def _step(self) -> tuple[list["Request"], list["Request"], int]:
        """One step: (requests finished, requests that got new tokens, tokens processed)."""
        self._check_alive()
        updated: list[Request] = []
        batch = self.scheduler.try_schedule()
        if batch is None and self._inflight:
            # Nothing can start until the steps in flight are read back (they may free blocks).
            updated += self._finalize_all()
            batch = self.scheduler.try_schedule()
        num_tokens = 0
        if batch is not None:
            try:
                result = self.model_runner.launch(batch)
            except BaseException:  # KeyboardInterrupt included: a later step must run the batch again
                self.scheduler.unschedule(batch)
                raise
            self._inflight.append((self.scheduler.on_launched(batch), result))
            if len(self._inflight) > 1:  # read back the previous step while this one runs
                updated += self._finalize_oldest()
            if not self.config.overlap_scheduling or not self.scheduler.has_unlaunched_work():
                updated += self._finalize_all()
            num_tokens = batch.num_tokens if batch.is_prefill else -len(batch.seqs)
        elif not self.scheduler.is_finished():
            raise RuntimeError("scheduler has no sequence to run although requests are pending")
        updated = list(dict.fromkeys(updated))  # one request can get tokens from two reads in one call
        finished = [r for r in updated if r.seq.is_finished]
        for request in finished:
            self._requests.pop(request.seq.seq_id, None)
        return finished, updated, num_tokens

    def _finalize_all(self) -> list["Request"]:
        updated = []
        while self._inflight:
            updated += self._finalize_oldest()
        return updated

    def _finalize_oldest(self) -> list["Request"]:
        """Read back the oldest step in flight and apply its tokens; returns the requests that got
        one. If reading raises (or is interrupted), the step stays in flight."""
        launched, result = self._inflight[0]
        tokens = result.tolist()
        logprobs = result.logprobs()
        self._inflight.popleft()
        self.scheduler.finalize(launched, tokens)
        row_of = {id(seq): i for i, seq in enumerate(launched.batch.seqs)}
        updated = []
        for seq, index in launched.accepted:
            request = self._requests.get(seq.seq_id)
            if request is None:
                continue
            if logprobs is not None and seq.params.logprobs is not None:
                request.logprobs.append(logprobs[row_of[id(seq)]])
            request.on_token(index, self.scheduler)
            updated.append(request)
        return updated

    def _drain_after_error(self) -> None:
        """After an exception mid-step: apply the steps in flight that can be read; if one cannot,
        drop it and those after it and abort their requests (their placeholders would never fill)."""
        try:
            self._finalize_all()
        except BaseException:
            dropped = list(self._inflight)
            self._inflight.clear()
            for launched, _ in dropped:
                for seq in launched.batch.seqs:
                    if seq.seq_id in self._requests:
                        self.abort_request(seq.seq_id)

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and not self._inflight

    # ---- batch entry points -------------------------------------------------------------------

    def _queue_all(self, prompts, sampling_params) -> list[Sequence]:
        if isinstance(prompts, str) or not isinstance(prompts, SequenceABC):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if isinstance(sampling_params, SequenceABC):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        # Validate every request before queueing any, so a bad one leaves nothing behind.
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self._enqueue(seq)
        return seqs

    def _check_none_vanished(self, remaining: int) -> None:
        """An internal invariant: requests still awaited must still be in the scheduler (else the
        caller's loop would step forever)."""
        if remaining > 0 and self.is_finished():
            raise RuntimeError(f"{remaining} request(s) vanished from the scheduler (internal error)")

    def _abort_unfinished(self, seqs: list[Sequence]) -> None:
        self._drain_after_error()
        for seq in seqs:
            if seq.seq_id in self._requests:
                self.abort_request(seq.seq_id)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Complete every prompt. Returns one dict per prompt, in prompt order: `text`, `token_ids`,
        `finish_reason` ("stop" or "length") and, when asked for, `logprobs`."""
        self._check_alive()
        seqs = self._queue_all(prompts, sampling_params)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        results: list[dict | None] = [None] * len(seqs)
        pbar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            remaining = len(seqs)
            while remaining > 0:
                t = perf_counter()
                finished, _, num_tokens = self._step()
                dt = perf_counter() - t
                if num_tokens > 0:
                    prefill_tps = num_tokens / dt
                elif num_tokens < 0:
                    decode_tps = -num_tokens / dt
                pbar.set_postfix(Prefill=f"{int(prefill_tps)}tok/s", Decode=f"{int(decode_tps)}tok/s")
                for request in finished:
                    i = order.get(request.seq.seq_id)
                    if i is not None:
                        results[i] = request.output()
                        remaining -= 1
                        pbar.update(1)
                self._check_none_vanished(remaining)
        except BaseException:
            self._abort_unfinished(seqs)
            raise
        finally:
            pbar.close()
        return results

    def stream(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams],
    ) -> Iterator[dict]:
        """Generate like `generate`, yielding what is new as it comes: dicts with `index` (the prompt's
        position), `text` and `token_ids` (new since that prompt's last result), `finished` and
        `finish_reason`. Joined, a prompt's pieces equal what `generate` returns for it."""
        self._check_alive()
        seqs = self._queue_all(prompts, sampling_params)
        order = {seq.seq_id: i for i, seq in enumerate(seqs)}
        remaining = len(seqs)
        try:
            while remaining > 0:
                _, updated, _ = self._step()
                for request in updated:
                    i = order.get(request.seq.seq_id)
                    if i is None:
                        continue
                    delta = request.delta()
                    if delta is None:
                        continue
                    remaining -= delta["finished"]
                    yield {"index": i, **delta}
                self._check_none_vanished(remaining)
        except BaseException:  # GeneratorExit (the caller stopped early) included
            self._abort_unfinished(seqs)
            raise

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them, through the
        tokenizer's chat template with the generation prompt added. Returns `generate`'s dicts."""
        if not isinstance(messages, list) or not messages:
            raise TypeError(
                "messages must be a conversation (a list of role/content dicts) or a list of them"
            )
        conversations = [messages] if isinstance(messages[0], dict) else messages
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template")
        prompts = []
        for conv in conversations:
            if not isinstance(conv, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conv
            ):
                raise TypeError("each message must be a dict with 'role' and 'content'")
            ids = self.tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
            # transformers 5 returns a BatchEncoding here, 4 a plain list of ids
            prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


class Request:
    """Engine-side state of one request: text for stop strings and streaming, log-probabilities."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.tokenizer = tokenizer
        self.logprobs: list[dict[int, float]] = []
        self.stops = seq.params.stop or []
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.num_seen = 0  # completion tokens given to the detokenizer
        self.stop_text: str | None = None  # the text cut at a stop string, once one matched
        self.sent_tokens = 0  # streaming: completion tokens already yielded
        self.sent_text = 0  # streaming: characters already yielded

    def known_completion(self) -> list[int]:
        """Completion token ids without a trailing token still being sampled."""
        ids = self.seq.completion_token_ids
        while ids and ids[-1] == PLACEHOLDER_TOKEN:
            ids = ids[:-1]
        return ids

    def _advance_text(self, final: bool) -> None:
        completion = self.known_completion()
        if self.num_seen < len(completion) or final:
            self.detokenizer.add(completion[self.num_seen :], final=final)
            self.num_seen = len(completion)

    def on_token(self, index: int, scheduler) -> None:
        """A sampled token was filled in at `index`: look for stop strings."""
        if not self.stops or self.stop_text is not None:
            return
        before = len(self.detokenizer.text)
        # Stop strings are searched in released text; hold nothing back once the sequence is done.
        # Tokens are filled in order, so every known completion token ends at `index`.
        self._advance_text(final=self.seq.is_finished)
        cut = find_stop(self.detokenizer.text, self.stops, before)
        if cut is not None:
            self.stop_text = self.detokenizer.text[:cut]
            if not self.seq.is_finished:
                scheduler.stop_early(self.seq, index + 1, "stop")
            else:
                self.seq.finish_reason = "stop"

    def text(self) -> str:
        if self.stop_text is not None:
            return self.stop_text
        return self.tokenizer.decode(self.seq.completion_token_ids)

    def output(self) -> dict:
        out = {
            "text": self.text(),
            "token_ids": self.seq.completion_token_ids,
            "finish_reason": self.seq.finish_reason,
        }
        if self.seq.params.logprobs is not None:
            out["logprobs"] = self.logprobs[: len(out["token_ids"])]
        return out

    def delta(self) -> dict | None:
        """What is new since the last delta (streaming), or None if nothing is."""
        finished = self.seq.is_finished
        if self.stop_text is not None:
            text = self.stop_text
        else:
            self._advance_text(final=finished)
            text = self.detokenizer.text
            if self.stops and not finished:
                # Hold back what could be the start of a stop string still being generated.
                hold = max(len(stop) for stop in self.stops) - 1
                text = text[: max(self.sent_text, len(text) - hold)]
        new_tokens = self.known_completion()[self.sent_tokens :]
        new_text = text[self.sent_text :]
        if not new_tokens and not new_text and not finished:
            return None
        self.sent_tokens += len(new_tokens)
        self.sent_text = len(text)
        return {
            "text": new_text,
            "token_ids": new_tokens,
            "finished": finished,
            "finish_reason": self.seq.finish_reason if finished else None,
        }
