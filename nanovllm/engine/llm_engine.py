"""The offline engine: tokenizes requests, schedules steps, runs them on the model and hands each
request's results to the caller that owns it.

Threads. One engine may be called from any number of threads at once. All of them share one
continuous batch: whichever caller needs progress steps the engine (one step at a time, under the
engine's condition variable) and routes every changed request to its owner; the other callers wait
for that step and then look at their own requests. A `generate` in one thread and a `stream` in
another are thus served in the same steps, and each gets exactly its own results. Adding and aborting
requests wait for the step in progress to end.
"""

import atexit
import functools
import itertools
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import numpy as np
import torch
from tqdm.auto import tqdm

from nanovllm.config import make_config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.interrupts import deferred_interrupts
from nanovllm.engine.output_collector import GenerateCollector, StepCollector, StreamCollector
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp import create_model_runner
from nanovllm.inputs import ParsedPrompt, PromptType, parse_prompt, parse_prompts, prompt_token_ids
from nanovllm.layers.logits_processor import check_vocab
from nanovllm.layers.rotary_embedding import rope_is_length_dependent
from nanovllm.models.registry import check_model_config, kv_release_window
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams, params_per_prompt
from nanovllm.structured_output import StructuredOutputManager
from nanovllm.structured_output.manager import TokenBitmask
from nanovllm.utils.generation_config import default_sampling_params, eos_token_ids
from nanovllm.utils.tokenizer import load_tokenizer

# Seeds drawn for unseeded requests when the engine has a seed (SamplingParams.seed is any int).
_SEED_BITS = 63


def _exit_if_alive(engine: "weakref.ref[LLMEngine]") -> None:
    if (alive := engine()) is not None:
        alive.exit()


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load (`LLMEngine.get_stats()`), for metrics: requests with a
    sequence running (or waiting only), and KV-cache blocks (free ones include cached prefixes)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int

    @property
    def kv_cache_usage(self) -> float:
        """The share of KV-cache blocks in use, in [0, 1] (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        config = make_config(model, kwargs)
        if config.data_parallel_size != 1:  # one engine is one replica: LLM(...) runs several on Ray
            raise ValueError(
                f"LLMEngine runs one replica (got data_parallel_size={config.data_parallel_size}); use "
                "LLM(model, data_parallel_size=N) for N replicas on Ray"
            )
        # Refuse unservable models before anything is loaded (or any tensor-parallel worker started).
        check_model_config(config.hf_config, config.max_model_len, config.quant_config)
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self._default_params = default_sampling_params(config.model)
        config.eos_token_ids = eos_token_ids(self.tokenizer, config.model, config.hf_config)
        self.vocab_size = config.hf_config.vocab_size
        self._exited = False
        # vLLM's LLMEngine.step() returns RequestOutputs; the original's returns (finished, num_tokens).
        self._vllm_step = False
        self.model_runner = create_model_runner(config)  # workers too when tensor-parallel
        self.block_manager = BlockManager(
            config.num_kvcache_blocks,
            config.kvcache_block_size,
            # A length-dependent rope (dynamic, longrope) rotates a prompt's keys by its length: another
            # prompt sharing the blocks would need other keys, so nothing is shared between requests.
            config.enable_prefix_caching and not rope_is_length_dependent(config.hf_config),
            sliding_window=kv_release_window(config.hf_config),
        )
        self._seq_ids = itertools.count()
        self.scheduler = Scheduler(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.eos_token_ids,
            self.block_manager,
            config.max_model_len,
            seq_ids=self._seq_ids,
            fork_params=_fork_params,
        )
        self.model_runner.logits_processors.tokenizer = self.tokenizer  # for bad_words
        self._structured = StructuredOutputManager(
            self.tokenizer,
            self.vocab_size,
            config.eos_token_ids,
            pin_memory=self.model_runner.device.type == "cuda",  # the bitmasks' copies do not block
        )
        # Unseeded requests get seeds from here when the engine has one, so runs repeat exactly.
        self._seed_rng = random.Random(config.seed) if config.seed is not None else None
        if config.seed is not None:
            seed_everything(config.seed)
        # (LaunchedBatch, StepResult) of launched steps not yet read back, oldest first (at most 2)
        self._inflight: deque = deque()
        self._requests: dict[int, Request] = {}  # unfinished requests by key (first sequence id)
        self._request_ids: dict[str, Request] = {}  # the same by request_id (vLLM's string ids)
        self._completion_of: dict[int, tuple[Request, int]] = {}  # sequence id -> (request, completion)
        self._num_host_token_seqs = 0  # live sequences whose sampler needs their tokens on the host
        self._step_outputs = StepCollector()  # the owner of requests queued with add_request
        # One thread steps at a time; the others wait on `_cond` for its steps to end.
        self._cond = threading.Condition()
        self._busy = False
        self._num_pending = 0  # threads waiting to add or abort requests: they go before the next step
        # Exit at interpreter exit. The hook holds the engine weakly: atexit.register(self.exit) would keep
        # an engine dropped without exit(), its weights and its KV cache alive until the interpreter exits.
        self._exit_hook = functools.partial(_exit_if_alive, weakref.ref(self))
        atexit.register(self._exit_hook)

    @classmethod
    def from_engine_args(cls, engine_args) -> "LLMEngine":
        """vLLM's constructor: an engine whose `step()` returns `RequestOutput`s (see `step`)."""
        engine = cls(**engine_args.to_kwargs())
        engine._vllm_step = True
        engine._step_outputs.keep_updates = True
        return engine

    # ---- lifecycle ---------------------------------------------------------------------------

    def exit(self) -> None:
        """Release the model, the KV cache and any worker; safe to call more than once."""
        if self._exited:
            return
        with self._exclusive():
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

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters used when none are given: the model's generation_config.json
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), as in vLLM."""
        return self._default_params.clone()

    # ---- one thread at a time ------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the engine: wait for the step in progress (another thread's) to end first."""
        with self._cond:
            self._num_pending += 1  # stepping threads let us in before their next step
            try:
                while self._busy:
                    self._cond.wait()
            finally:
                self._num_pending -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _drive(self, ready: Callable[[], bool], on_step: Callable[[int, float], None] | None = None) -> None:
        """Step the engine until `ready()`. While another thread steps, wait for its step instead:
        every step serves every caller's requests."""
        while True:
            with self._cond:
                while not ready() and (self._busy or self._num_pending):
                    self._cond.wait()
                if ready():
                    return
                self._busy = True
            try:
                t = perf_counter()
                num_tokens = self._step_and_route()
                if on_step is not None:
                    on_step(num_tokens, perf_counter() - t)
                if num_tokens == 0 and not self._inflight and not ready():
                    # An internal invariant: a step that ran nothing leaves nothing to wait for.
                    raise RuntimeError(
                        "requests awaited by a caller vanished from the scheduler (internal error)"
                    )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    # ---- requests ----------------------------------------------------------------------------

    def _token_ids(self, prompt: ParsedPrompt) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.config.max_model_len)

    def _check_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        """Refuse what this engine cannot serve; returns the engine's own copy of `params` (a caller
        changing theirs later does not reach a running request)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(
                    f"SamplingParams.{name}={value} is more than the vocabulary ({self.vocab_size} tokens)"
                )
        check_vocab(params, self.vocab_size)  # logit_bias and allowed_token_ids
        bs = self.config.kvcache_block_size
        longest = min(num_prompt_tokens + params.max_tokens, self.config.max_model_len)
        needed = self.block_manager.most_blocks_held(longest, self.config.max_num_batched_tokens)
        # The n completions share the prompt's full blocks; each needs its own partly filled last one.
        at_fork = self.block_manager.most_blocks_held(
            num_prompt_tokens, self.config.max_num_batched_tokens
        ) + (params.n - 1) * (num_prompt_tokens % bs != 0)
        if max(needed, at_fork) > self.block_manager.num_blocks:
            completions = f" and n={params.n} completions" if params.n > 1 else ""
            raise ValueError(
                f"a request of {num_prompt_tokens} prompt tokens and max_tokens={params.max_tokens}"
                f"{completions} can need {max(needed, at_fork)} KV blocks of {bs} tokens, but the cache "
                f"has only {self.block_manager.num_blocks}"
            )
        if params.seed is None and self._seed_rng is not None:
            params.seed = self._seed_rng.getrandbits(_SEED_BITS)
        return params

    def _make_request(
        self,
        prompt: ParsedPrompt,
        params: SamplingParams,
        owner,
        index: int | None = None,
        request_id: str | None = None,
    ) -> Request:
        """A validated request, not yet queued (seeds for unseeded requests are drawn here, in order)."""
        token_ids = self._token_ids(prompt)
        params = self._check_params(params, len(token_ids))
        seq = Sequence(next(self._seq_ids), token_ids, params, self.config.kvcache_block_size)
        seq.num_pending_forks = params.n - 1
        seq.needs_host_tokens = self.model_runner.logits_processors.needs_host_tokens(params)
        grammar = None
        if params.structured_outputs is not None:
            grammar = self._structured.compile(params.structured_outputs)  # ValueError if invalid
            seq.needs_host_tokens = True  # its next mask depends on the token just sampled
        request_id = str(seq.seq_id) if request_id is None else request_id
        request = Request(seq.seq_id, request_id, seq, prompt.text, params, self.tokenizer, owner, index)
        if grammar is not None:
            request.set_grammar(grammar, self._structured.new_matcher)
        return request

    def _enqueue(self, requests: list[Request]) -> None:
        with self._exclusive():
            self._check_alive()
            taken = [r.request_id for r in requests if r.request_id in self._request_ids]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use by an unfinished request")
            for request in requests:
                seq = request.completions[0].seq
                self._requests[request.key] = request
                self._request_ids[request.request_id] = request
                self._completion_of[seq.seq_id] = (request, 0)
                self._num_host_token_seqs += seq.needs_host_tokens
                self.scheduler.add(seq)

    def add_request(self, *args, **kwargs) -> int | None:
        """Queue one request; `step()` reports it.

        The original's form, `add_request(prompt, sampling_params)`, returns the request's id (an int).
        vLLM's form, `add_request(request_id: str, prompt, params)`, names it (returns None). A prompt
        is any form `generate` takes for one prompt.
        """
        self._check_alive()
        if len(args) + len(kwargs) >= 3 or "request_id" in kwargs:
            return self._add_named_request(*args, **kwargs)
        return self._add_request(*args, **kwargs)

    def _add_request(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> int:
        params = self._default_params if sampling_params is None else sampling_params
        request = self._make_request(parse_prompt(prompt), params, self._step_outputs)
        self._enqueue([request])
        return request.key

    def _add_named_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None
    ) -> None:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        params = self._default_params if params is None else params
        request = self._make_request(parse_prompt(prompt), params, self._step_outputs, request_id=request_id)
        self._enqueue([request])

    def add_request_with_owner(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None, owner
    ) -> None:
        """Queue one request whose results go to `owner` instead of to `step()`: front ends (the async
        engine) hand every request to one owner of theirs. `owner.on_update(request, finished)` is
        called by whichever thread steps the engine, with the engine held, each time the request gets
        tokens and once when it finishes or is aborted; it must not call back into the engine. Raises
        ValueError/TypeError for a bad prompt or parameters (nothing is queued then)."""
        self._check_alive()
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        params = self._default_params if params is None else params
        self._enqueue([self._make_request(parse_prompt(prompt), params, owner, request_id=request_id)])

    def get_stats(self) -> EngineStats:
        """Requests running and waiting and KV-cache blocks in use now (waits for a step in progress)."""
        with self._exclusive():
            def keys(seqs) -> set[int]:
                return {e[0].key for s in seqs if (e := self._completion_of.get(s.seq_id)) is not None}

            waiting, running = keys(self.scheduler.waiting), keys(self.scheduler.running)
            bm = self.block_manager
            return EngineStats(
                num_running=len(running),
                num_waiting=len(waiting - running),
                num_kv_blocks=bm.num_blocks,
                num_free_kv_blocks=bm.num_free_blocks,
            )

    def abort_request(self, request_id: int | str | list[str]) -> None:
        """Drop a queued or running request and free its KV blocks; whoever waits for it gets it back
        finished with finish_reason "abort". An int is the original API's id (unknown: ValueError);
        strings are vLLM's request ids (unknown or finished ones are ignored, as in vLLM)."""
        with self._exclusive():
            if isinstance(request_id, int) and not isinstance(request_id, bool):
                request = self._requests.get(request_id)
                if request is None:
                    raise ValueError(f"no unfinished request with id {request_id}")
                self._abort(request)
                return
            ids = [request_id] if isinstance(request_id, str) else list(request_id)
            for rid in ids:
                request = self._request_ids.get(rid)
                if request is not None:
                    self._abort(request)

    def _abort(self, request: Request) -> None:
        """Abort every unfinished completion of `request` and hand it to its owner (engine held)."""
        for completion in request.completions:
            self.scheduler.abort(completion.seq)
        request.completions[0].seq.num_pending_forks = 0
        self._retire([request])
        if request.owner is not self._step_outputs:  # step() does not report aborts (nor does vLLM's)
            request.owner.on_update(request, True)

    def _retire(self, requests: list[Request]) -> None:
        """Forget finished requests (engine held)."""
        released = []
        for request in requests:
            if self._requests.pop(request.key, None) is None:
                continue
            self._request_ids.pop(request.request_id, None)
            for completion in request.completions:
                seq = completion.seq
                self._completion_of.pop(seq.seq_id, None)
                self._num_host_token_seqs -= seq.needs_host_tokens
                released.append(seq.seq_id)
        if released:
            self.model_runner.release_sequences(released)

    def _abort_mine(self, requests: list[Request]) -> None:
        """After a caller's exception: apply what can be read of the steps in flight, then abort the
        caller's unfinished requests."""
        with self._exclusive():
            self._drain_after_error()
            for request in requests:
                if request.key in self._requests:
                    self._abort(request)

    # ---- stepping ----------------------------------------------------------------------------

    def step(self):
        """Run one step (or wait for the one another thread is running).

        Original form (`LLM(...)`): returns the requests queued with `add_request` that finished since
        the last call as (request id, completion token ids), and the tokens the step processed: positive
        for a prefill step, minus the batch size for decode. With overlap scheduling a request is reported
        one call after its last step. vLLM's form (`LLMEngine.from_engine_args`): returns a
        `RequestOutput` for each such request updated since the last call.
        """
        self._check_alive()
        with self._exclusive():
            num_tokens = self._step_and_route()
        if self._vllm_step:
            return self._step_outputs.take_outputs()
        return self._step_outputs.take_finished(), num_tokens

    def _step_and_route(self) -> int:
        """One step; hands each changed request to its owner. Returns the tokens processed."""
        self._check_alive()
        updated, num_tokens = self._step()
        done = [request.finished for request in updated]
        self._retire([request for request, finished in zip(updated, done) if finished])
        for request, finished in zip(updated, done):
            request.owner.on_update(request, finished)
        return num_tokens

    def _step(self) -> tuple[list[Request], int]:
        """One step: (requests that got new tokens, tokens processed)."""
        updated: list[Request] = []
        batch = self.scheduler.try_schedule()
        if batch is None and self._inflight:
            # Nothing can start until the steps in flight are read back (they may free blocks).
            updated += self._finalize_all()
            batch = self.scheduler.try_schedule()
        num_tokens = 0
        if batch is not None:
            with deferred_interrupts():  # a Ctrl-C lands after the launch is recorded, never inside it
                for parent, child in batch.forks:
                    self._add_fork(batch.seqs[parent], child)
                if batch.is_prefill:
                    batch.prompt_logprob_rows = [
                        i for i, seq in enumerate(batch.seqs) if self._wants_prompt_logprobs(seq)
                    ]
                masks = self._token_bitmask(batch) if self._num_host_token_seqs else None
                try:
                    if masks is None:
                        result = self.model_runner.launch(batch)
                    else:
                        result = self.model_runner.launch(batch, token_bitmask=masks)
                except BaseException:  # KeyboardInterrupt included: a later step must run the batch again
                    for _, child in reversed(batch.forks):
                        self._drop_fork(child)
                    self.scheduler.unschedule(batch)
                    raise
                for row in batch.prompt_logprob_rows:
                    seq = batch.seqs[row]
                    request, _ = self._completion_of[seq.seq_id]
                    end = seq.num_computed_tokens + batch.num_new_tokens[row] + 1
                    request.prompt_logprobs_launched = min(end, seq.num_prompt_tokens)
                self._inflight.append((self.scheduler.on_launched(batch), result))
            if len(self._inflight) > 1:  # read back the previous step while this one runs
                updated += self._finalize_oldest()
            if not self.config.overlap_scheduling or not self.scheduler.has_unlaunched_work():
                updated += self._finalize_all()
            num_tokens = batch.num_tokens if batch.is_prefill else -len(batch.seqs)
        elif not self.scheduler.is_finished():
            raise RuntimeError("scheduler has no sequence to run although requests are pending")
        return list(dict.fromkeys(updated)), num_tokens  # a request can get tokens from two reads

    def _token_bitmask(self, batch) -> TokenBitmask | None:
        """The bitmasks of the rows of `batch` whose completion follows a grammar, or None. Filled on the
        host while the GPU runs the step launched before (overlap scheduling): a constrained row is in
        `batch` only once its previous token has been read back, which is what its mask depends on."""
        rows, matchers = [], []
        for i, seq in enumerate(batch.rows):
            entry = self._completion_of.get(seq.seq_id)
            matcher = entry[0].completions[entry[1]].matcher if entry is not None else None
            if matcher is not None:
                rows.append(i)
                matchers.append(matcher)
        return self._structured.bitmask(matchers, rows) if rows else None

    def _wants_prompt_logprobs(self, seq: Sequence) -> bool:
        """Whether this prefill chunk of `seq` scores prompt tokens its request has no log-probabilities
        for yet (a recompute after preemption, or another completion, would score them again)."""
        if seq.params.prompt_logprobs is None:
            return False
        request, _ = self._completion_of[seq.seq_id]
        # This chunk scores prompt tokens num_computed + 1 onwards; launched chunks count (overlap
        # scheduling reads a chunk's log-probabilities back after the next one is launched).
        return request.prompt_logprobs_launched == seq.num_computed_tokens + 1 < seq.num_prompt_tokens

    def _add_fork(self, parent: Sequence, child: Sequence) -> None:
        request, _ = self._completion_of[parent.seq_id]
        completion = request.add_completion(child)
        self._completion_of[child.seq_id] = (request, completion.index)
        self._num_host_token_seqs += child.needs_host_tokens

    def _drop_fork(self, child: Sequence) -> None:
        request, index = self._completion_of.pop(child.seq_id)
        del request.completions[index]  # forks are dropped newest first (reversed), so indices hold
        self._num_host_token_seqs -= child.needs_host_tokens

    def _finalize_all(self) -> list[Request]:
        updated = []
        while self._inflight:
            updated += self._finalize_oldest()
        return updated

    def _finalize_oldest(self) -> list[Request]:
        """Read back the oldest step in flight and apply its tokens; returns the requests that got
        one. If reading raises (or is interrupted), the step stays in flight."""
        launched, result = self._inflight[0]
        tokens = result.tolist()
        logprobs = result.logprobs()
        prompt_logprobs = result.prompt_logprobs()
        self._inflight.popleft()
        self.scheduler.finalize(launched, tokens)
        batch = launched.batch
        updated = []
        for row, lps in prompt_logprobs.items():
            entry = self._completion_of.get(batch.seqs[row].seq_id)
            if entry is not None:
                entry[0].add_prompt_logprobs(lps)
        row_of = {id(seq): i for i, seq in enumerate(batch.rows)} if logprobs is not None else None
        for seq, index in launched.accepted:
            entry = self._completion_of.get(seq.seq_id)
            if entry is None:
                continue
            request, c = entry
            completion = request.completions[c]
            if index == seq.num_prompt_tokens:
                request.num_cached_tokens = seq.num_cached_tokens
            if logprobs is not None and seq.params.logprobs is not None:
                completion.add_logprobs(logprobs[row_of[id(seq)]])
            completion.on_token(index, self.scheduler)
            updated.append(request)
        return updated

    def _drain_after_error(self) -> None:
        """After an exception mid-step: apply the steps in flight that can be read; if one cannot,
        drop it and those after it and abort their requests (their placeholders would never fill)."""
        try:
            for request in self._finalize_all():
                finished = request.finished
                if finished:
                    self._retire([request])
                request.owner.on_update(request, finished)
        except BaseException:
            dropped = list(self._inflight)
            self._inflight.clear()
            for launched, _ in dropped:
                for seq in launched.batch.rows:
                    entry = self._completion_of.get(seq.seq_id)
                    if entry is not None and entry[0].key in self._requests:
                        self._abort(entry[0])

    def is_finished(self) -> bool:
        """Whether no request is unfinished and `step()` has nothing left to report."""
        return not self._requests and not self._step_outputs.has_unreported()

    def has_unfinished_requests(self) -> bool:
        """vLLM's name: whether any request is unfinished or `step()` has something left to report."""
        return not self.is_finished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- batch entry points -------------------------------------------------------------------

    def _submit(self, parsed: list[ParsedPrompt], sampling_params, owner) -> list[Request]:
        """Validate every request, then queue them all (a bad one leaves nothing behind)."""
        params = params_per_prompt(sampling_params, self._default_params, len(parsed))
        requests = [self._make_request(p, sp, owner, i) for i, (p, sp) in enumerate(zip(parsed, params))]
        self._enqueue(requests)
        return requests

    # ---- for front ends (AsyncLLM, the Ray replicas and driver) ----------------------------------
    # What a front end needs beyond generate/stream/add_request: the engine's own checks, ahead of
    # queueing, and the batch entry points generate and stream are built on.

    def validate_request(self, sampling_params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        """The checks `generate` runs on a request of `num_prompt_tokens` prompt tokens before queueing
        it: its sampling parameters (values, vocabulary, KV-cache fit) and its structured-output
        constraint (compiled and cached). Returns the engine's own copy of `sampling_params` (an
        unseeded one gets its seed here when the engine has one, in call order); ValueError/TypeError
        naming the problem otherwise. Queues nothing."""
        params = self._check_params(sampling_params, num_prompt_tokens)
        self.compile_constraint(params)
        return params

    def compile_constraint(self, sampling_params: SamplingParams | None):
        """Compile `sampling_params.structured_outputs` ahead of its request (a large schema can take a
        while; a front end may do it off its event loop). The grammar is cached by constraint, so the
        request's own compile later finds it. Returns the grammar, or None when there is no constraint;
        an invalid schema, regex or grammar is a ValueError."""
        if sampling_params is None:
            return None
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if sampling_params.structured_outputs is None:
            return None
        return self._structured.compile(sampling_params.structured_outputs)

    def add_requests(self, prompts: list[ParsedPrompt], sampling_params, owner) -> list[Request]:
        """Validate every prompt (as `parse_prompts` returns them) with its sampling parameters (one
        for all, one per prompt, or None for the defaults), then queue them all for `owner` (an object
        with `on_update(request, finished)`; request.index is the prompt's position); a bad one leaves
        nothing queued. Returns the requests; nothing steps until `run_until` (or `step`)."""
        return self._submit(prompts, sampling_params, owner)

    def run_until(
        self, ready: Callable[[], bool], on_step: Callable[[int, float], None] | None = None
    ) -> None:
        """Step the engine until `ready()` is true, sharing the steps with other threads' callers
        (while another thread steps, wait for its step instead). `on_step(num_tokens, seconds)` follows
        each step this thread ran."""
        self._drive(ready, on_step)

    def abort_owned_requests(self, requests: list[Request]) -> None:
        """Abort the unfinished ones of `requests` (from `add_requests`), after applying what can be
        read of the steps in flight: what a caller does when it stops early or fails. Their owner gets
        each aborted request as finished."""
        self._abort_mine(requests)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt (a string, token ids, a prompt dict, or a list of them). Returns one
        `RequestOutput` per prompt, in prompt order; `out["text"]` and `out["token_ids"]` read its first
        completion. `sampling_params` defaults to `get_default_sampling_params()`."""
        self._check_alive()
        parsed = parse_prompts(prompts)
        pbar = tqdm(total=len(parsed), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            collector = GenerateCollector(len(parsed), pbar if use_tqdm else None)
            requests = self._submit(parsed, sampling_params, collector)
            speed = {"Prefill": 0.0, "Decode": 0.0}

            def show(num_tokens: int, dt: float) -> None:
                if num_tokens:
                    speed["Prefill" if num_tokens > 0 else "Decode"] = abs(num_tokens) / dt
                pbar.set_postfix({k: f"{int(v)}tok/s" for k, v in speed.items()})

            try:
                self._drive(collector.done, show if use_tqdm else None)
            except BaseException:
                self._abort_mine(requests)
                raise
        finally:
            pbar.close()
        return collector.results

    def stream(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> Iterator[dict]:
        """Generate like `generate`, yielding what is new as it comes: dicts with `index` (the prompt's
        position), `request_id` (for `abort_request`), `completion` (which of its n completions), `text`
        and `token_ids` (new since that completion's last result), `finished` and `finish_reason`.
        Joined, a completion's pieces equal what `generate` returns for it."""
        self._check_alive()
        parsed = parse_prompts(prompts)
        collector = StreamCollector(len(parsed))
        requests = self._submit(parsed, sampling_params, collector)
        try:
            while True:
                while collector.items:
                    yield collector.items.popleft()
                if collector.remaining == 0:
                    return
                self._drive(collector.ready)
        except BaseException:  # GeneratorExit (the caller stopped early) included
            self._abort_mine(requests)
            raise

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them through the
        chat template (the tokenizer's, or `chat_template`), as vLLM's `LLM.chat`; returns `generate`'s
        outputs. `chat_template_kwargs` reach the template (e.g. {"enable_thinking": False} for Qwen3)."""
        if not isinstance(messages, list) or not messages:
            raise TypeError(
                "messages must be a conversation (a list of role/content dicts) or a list of them"
            )
        conversations = [messages] if isinstance(messages[0], dict) else messages
        if chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        prompts = []
        for conv in conversations:
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                raise TypeError("each message must be a dict with 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(
                conv,
                tokenize=False,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            # The template already holds any BOS: tokenize without adding special tokens (as vLLM).
            prompts.append(
                {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
            )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def seed_everything(seed: int) -> None:
    """As vLLM does for an engine seed: seed Python's, numpy's and torch's global generators, so a script
    that also draws its own random numbers repeats run to run (process-wide, like theirs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fork_params(parent: Sequence, i: int) -> SamplingParams:
    """Completion i of a request samples with the request's parameters; a seeded one with seed + i (as
    vLLM), so the completions differ and each repeats run to run."""
    params = parent.params
    if params.seed is None:
        return params
    child = params.clone()
    child.seed = params.seed + i
    return child
