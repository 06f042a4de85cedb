"""AsyncLLM: the engine behind an asyncio front end (the OpenAI server), as vLLM's `AsyncLLM`.

One engine thread owns the `LLMEngine`: it takes new requests and aborts from a queue between steps,
steps while any request is unfinished, and after each step hands every changed request's new text and
tokens to the event loop in one call. Each request is an async iterator of `RequestUpdate`s, so many
HTTP requests share one continuous batch, and nothing the event loop runs waits for a step.

A reader that falls behind gets its tokens coalesced, never dropped or reordered: while the last update
built for a request is still unread, the engine thread builds no new one for it (no detokenizing, no
update object); once the reader has taken it, the next update carries every token since, with their
log-probabilities and the finish reason. An update that arrives while another is unread (the final one)
is merged into it. A slow reader (a client reading slowly, a busy event loop) so costs no work per step
and no growing queue, and gets several tokens per update; one that keeps up gets an update per step.

    engine = AsyncLLM.from_engine_args(EngineArgs(model=...))
    async for update in engine.generate({"prompt_token_ids": ids}, SamplingParams(...), "req-1"):
        ...  # update.completions: what is new per completion; update.finished at the end
    engine.shutdown()

Leaving the iterator early (`break`, a cancelled task, a closed HTTP stream) aborts the request, which
frees its KV blocks.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nanovllm.engine.llm_engine import EngineStats, LLMEngine
from nanovllm.engine.request import Request
from nanovllm.inputs import PromptType
from nanovllm.outputs import Logprob, PromptLogprobs
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CompletionDelta:
    """What one completion gained since its last delta: text, token ids and (when asked) their
    log-probabilities; `finish_reason`/`stop_reason` once it has finished."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestUpdate:
    """One step's news for one request: a delta per completion that changed. `finished` once every
    completion has; the first update of a request carries `prompt_logprobs` when they were asked for."""

    request_id: str
    prompt_token_ids: list[int]
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    # Set by the engine thread: when the step that made this update ended (time.monotonic()) and its
    # number (updates of one step share it: the requests were batched together); for coalesced updates,
    # the latest step's.
    time: float = 0.0
    step: int = 0
    number: int = 0  # the request's updates built so far, this one included (coalescing's bookkeeping)

    def merge(self, later: "RequestUpdate") -> None:
        """Append `later` (the same request's next update) to this one, as if they had been one."""
        mine = {d.index: d for d in self.completions}
        for d in later.completions:
            own = mine.get(d.index)
            if own is None:
                self.completions.append(d)
                mine[d.index] = d
                continue
            own.text += d.text
            own.token_ids = own.token_ids + d.token_ids
            if d.logprobs is not None:
                own.logprobs = d.logprobs if own.logprobs is None else own.logprobs + d.logprobs
            if d.finish_reason is not None:
                own.finish_reason, own.stop_reason = d.finish_reason, d.stop_reason
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.time, self.step, self.number = later.time, later.step, later.number


@dataclass(slots=True)
class StepRecord:
    """One engine step, for metrics: tokens computed (prefill) or sequences decoded, and its length."""

    is_prefill: bool
    num_tokens: int
    seconds: float


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; the server cannot serve any more requests."""


@dataclass(slots=True)
class _Stream:
    """One request's updates on their way to its reader: the unread ones (at most one update, later ones
    merged into it, and an exception that ends the stream), and how far the reader has got."""

    unread: deque = field(default_factory=deque)  # event loop only
    waiter: asyncio.Future | None = None  # the reader waiting in get(), if any
    sent_logprobs: dict[int, int] = field(default_factory=dict)  # per completion, entries already sent
    sent_prompt_logprobs: bool = False
    # Each side writes only its own counter, so the engine thread can compare them without a lock.
    posted: int = 0  # engine thread: updates built for this stream (the newest one's `number`)
    taken: int = 0  # event loop: the `number` of the newest update the reader has taken

    def put(self, item: "RequestUpdate | BaseException") -> None:
        """In the event loop: queue an update (merged into an unread one) or an exception."""
        unread = self.unread
        if unread and isinstance(item, RequestUpdate) and isinstance(unread[-1], RequestUpdate):
            unread[-1].merge(item)
        else:
            unread.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> "RequestUpdate | BaseException":
        while not self.unread:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.unread.popleft()
        if isinstance(item, RequestUpdate):
            self.taken = item.number
        return item


class _Owner:
    """The owner of every request this AsyncLLM queues: turns each update into a `RequestUpdate`
    (in the engine thread, with the engine held) and keeps them, each with the stream it is for, for
    the thread to hand over. A request id is unique only among unfinished requests (a client may
    reuse one as soon as its request ends), so updates travel with their stream, never by id alone.
    A request whose reader has not taken its last update yet is set aside (`deferred`) instead, until
    it has (`build_ready`) or the request finishes."""

    def __init__(self):
        self.pending: list[tuple[_Stream, RequestUpdate]] = []
        self.streams: dict[str, _Stream] = {}  # engine thread only: the unfinished requests' streams
        self.deferred: dict[str, Request] = {}  # engine thread only: changed, not built (reader behind)

    def on_update(self, request: Request, finished: bool) -> None:
        stream = self.streams.get(request.request_id)
        if stream is None:
            return
        if not finished and stream.taken != stream.posted:
            self.deferred[request.request_id] = request
            return
        self.deferred.pop(request.request_id, None)
        self._build(stream, request, finished)

    def build_ready(self) -> None:
        """Build the deferred requests' updates whose readers have caught up (between steps)."""
        ready = [rid for rid in self.deferred if (s := self.streams[rid]).taken == s.posted]
        for rid in ready:
            self._build(self.streams[rid], self.deferred.pop(rid), False)

    def _build(self, stream: _Stream, request: Request, finished: bool) -> None:
        """The request's news since its last update (every completion's delta), queued in `pending`."""
        deltas = []
        for completion in request.completions:
            sent_tokens = completion.sent_tokens
            delta = completion.delta()
            if delta is None:
                continue
            logprobs = None
            if completion.params.logprobs is not None:
                start = stream.sent_logprobs.get(completion.index, 0)
                end = sent_tokens + len(delta["token_ids"])
                logprobs = completion.logprobs[start:end]
                stream.sent_logprobs[completion.index] = end
            out = completion.output() if delta["finished"] else None
            deltas.append(
                CompletionDelta(
                    index=completion.index,
                    text=delta["text"],
                    token_ids=delta["token_ids"],
                    logprobs=logprobs,
                    finish_reason=delta["finish_reason"],
                    stop_reason=out.stop_reason if out is not None else None,
                )
            )
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not stream.sent_prompt_logprobs:
            if len(request.prompt_logprobs) == len(request.prompt_token_ids):  # every chunk read back
                prompt_logprobs = list(request.prompt_logprobs)
                stream.sent_prompt_logprobs = True
        if not deltas and not finished and prompt_logprobs is None:
            return
        update = RequestUpdate(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            completions=deltas,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )
        stream.posted += 1
        update.number = stream.posted
        self.pending.append((stream, update))
        if finished:
            del self.streams[request.request_id]


class AsyncLLM:
    """An `LLMEngine` driven by one thread of its own, with async per-request output streams."""

    def __init__(self, engine: LLMEngine, log_requests: bool = False):
        self.engine = engine
        self.log_requests = log_requests
        self._owner = _Owner()
        self._streams: dict[str, _Stream] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()  # guards the inbox below
        # ("add", request_id, prompt, params, future, stream), ("abort", ids) or ("stats", future)
        self._inbox: deque = deque()
        self._stopping = False
        self._dead: BaseException | None = None
        self._num_steps = 0
        self.on_step = None  # optional callable(StepRecord), called in the engine thread after each step
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> "AsyncLLM":
        return cls(LLMEngine(**engine_args.to_kwargs()), **kwargs)

    # ---- event-loop side ------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        """Requests this AsyncLLM has queued that have not finished yet (their streams are open)."""
        return len(self._streams)

    def _post(self, item: tuple) -> None:
        with self._cond:
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if self._dead is not None:
                raise EngineDeadError(f"the engine stopped on an error: {self._dead!r}") from self._dead
            self._inbox.append(item)
            self._cond.notify()

    async def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None
    ) -> "RequestStream":
        """Queue a request; returns once the engine has accepted it (ValueError/TypeError for bad input,
        raised here), as an async iterator of its updates. Closing it early aborts the request."""
        if getattr(sampling_params, "structured_outputs", None) is not None:
            # Compile the grammar in a worker thread, before the engine thread sees the request: a
            # large schema then stalls neither the event loop nor the running streams' steps. The
            # grammars are cached by constraint, so the engine's own compile finds it (an invalid
            # one is the same ValueError, raised here).
            await asyncio.to_thread(self.engine.compile_constraint, sampling_params)
        loop = self._bind_loop()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        stream = _Stream()
        self._streams[request_id] = stream
        accepted = loop.create_future()
        try:
            self._post(("add", request_id, prompt, sampling_params, accepted, stream))
            await accepted
        except BaseException:
            self._forget(request_id, stream)
            refused = accepted.done() and not accepted.cancelled() and accepted.exception() is not None
            if not refused:  # cancelled while queued or just accepted: abort it (an unknown id is ignored)
                self._post_abort([request_id])
            raise
        if self.log_requests:
            logger.info("added request %s", request_id)
        return RequestStream(self, request_id, stream)

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestUpdate]:
        """vLLM's form: `async for update in engine.generate(prompt, params, request_id)`."""
        updates = await self.add_request(request_id, prompt, sampling_params)
        try:
            async for update in updates:
                yield update
        finally:
            await updates.aclose()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which the engine thread then hands its results to."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("an AsyncLLM serves one event loop at a time (another has open requests)")
            self._loop = loop
        return loop

    def _post_abort(self, request_ids: list[str]) -> None:
        try:
            self._post(("abort", request_ids))
        except EngineDeadError:
            pass  # nothing runs any more

    async def abort(self, request_id: str | list[str]) -> None:
        """Abort requests by id (unknown or finished ones are ignored); their streams end with
        finish_reason "abort"."""
        self._post_abort([request_id] if isinstance(request_id, str) else list(request_id))

    async def get_stats(self) -> EngineStats:
        """The engine's load now, read by the engine thread between two steps. (Another thread asking
        the engine would wait for a gap between its steps, and the engine thread, stepping back to back
        under load, need not leave one: a /metrics scrape could hang until the load ends.)"""
        if not self.is_running:  # nothing steps: ask the engine directly
            return await asyncio.to_thread(self.engine.get_stats)
        answer = self._bind_loop().create_future()
        try:
            self._post(("stats", answer))
        except EngineDeadError:
            return await asyncio.to_thread(self.engine.get_stats)
        return await answer

    @property
    def num_steps(self) -> int:
        """Engine steps run so far."""
        return self._num_steps

    def _deliver(self, updates: list[tuple[_Stream, RequestUpdate]]) -> None:
        """In the event loop: put each update on its stream's queue, if that stream is still open (a
        stream closed early, whose id may already name a new request, gets nothing more)."""
        streams = self._streams
        for stream, update in updates:
            if streams.get(update.request_id) is stream:
                stream.put(update)

    def _forget(self, request_id: str, stream: _Stream) -> None:
        """In the event loop: drop `stream` from the open streams (not a newer one under its id)."""
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread (requests still running are aborted) and exit the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self.engine.exit()

    # ---- engine thread --------------------------------------------------------------------------

    def _take_inbox(self) -> list[tuple] | None:
        """Wait for work: the inbox's items (empty when requests are running), None when stopping."""
        with self._cond:
            while not self._inbox and not self._stopping and self.engine.get_num_unfinished_requests() == 0:
                self._cond.wait()
            if self._stopping:
                return None
            items = list(self._inbox)
            self._inbox.clear()
            return items

    def _call_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _answer_stats(self, future: asyncio.Future) -> None:
        try:
            stats = self.engine.get_stats()
        except Exception as e:
            self._call_loop(_settle, future, e)
        else:
            self._call_loop(_settle, future, None, stats)

    def _handle(self, items: list[tuple]) -> None:
        """Apply the inbox's adds and aborts in the order they were posted: a client that cancels a
        request and sends it again under the same id posts [abort x, add x], and the add must find x
        gone (the abort's final update goes to the old stream, the new request's to the new one)."""
        for item in items:
            if item[0] == "abort":
                self.engine.abort_request(item[1])
                continue
            if item[0] == "stats":
                self._answer_stats(item[1])
                continue
            _, request_id, prompt, params, accepted, stream = item
            if request_id in self._owner.streams:  # an unfinished request holds the id: keep its stream
                error = ValueError(f"request id {request_id!r} is already in use by an unfinished request")
                self._call_loop(_settle, accepted, error)
                continue
            self._owner.streams[request_id] = stream
            try:
                self.engine.add_request_with_owner(request_id, prompt, params, self._owner)
            except Exception as e:  # bad input: the caller gets it, the engine goes on
                if self._owner.streams.get(request_id) is stream:
                    del self._owner.streams[request_id]
                self._call_loop(_settle, accepted, e)
            else:
                self._call_loop(_settle, accepted, None)

    def _run(self) -> None:
        try:
            while True:
                items = self._take_inbox()
                if items is None:
                    break
                if items:
                    self._handle(items)
                if self.engine.get_num_unfinished_requests() == 0:
                    self._flush()  # aborts end their streams without a step
                    continue
                t = time.perf_counter()
                _, num_tokens = self.engine.step()
                seconds = time.perf_counter() - t
                self._num_steps += 1
                if self.on_step is not None and num_tokens:
                    self.on_step(StepRecord(num_tokens > 0, abs(num_tokens), seconds))
                self._flush()
        except BaseException as e:  # an engine failure: every open stream gets the error
            logger.exception("the engine thread stopped on an error")
            with self._cond:
                self._dead = e
            self._call_loop(self._fail_all, EngineDeadError(f"the engine stopped on an error: {e!r}"))
        finally:
            with self._cond:
                self._stopping = True
                left, self._inbox = list(self._inbox), deque()
            for item in left:  # posted too late: refused (adds) or answered (stats)
                if item[0] == "add":
                    self._call_loop(_settle, item[4], EngineDeadError("the engine is shutting down"))
                elif item[0] == "stats":
                    self._answer_stats(item[1])
            # Requests still open when stopping end as aborted.
            if self._owner.streams:
                try:
                    self.engine.abort_request(list(self._owner.streams))
                    self._flush()
                except Exception:
                    logger.exception("aborting the open requests at shutdown failed")

    def _flush(self) -> None:
        owner = self._owner
        if owner.deferred:
            # Between steps, in the only thread that steps or changes this engine's requests (aborts
            # come through the inbox): the requests are as on_update saw them.
            owner.build_ready()
        updates, owner.pending = owner.pending, []
        if updates:
            now = time.monotonic()
            for _, update in updates:
                update.time = now
                update.step = self._num_steps
            self._call_loop(self._deliver, updates)


class RequestStream:
    """One request's updates as an async iterator. `aclose()` before the last update (also when it was
    never iterated, or when the consumer is cancelled while waiting) aborts the request; so does
    dropping it unfinished."""

    def __init__(self, owner: AsyncLLM, request_id: str, stream: _Stream):
        self._owner = owner
        self.request_id = request_id
        self._stream = stream
        self.finished = False
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestUpdate:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._stream.get()
        except BaseException:  # cancelled while waiting: nobody will read the rest
            self._close()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self._close()
            raise item
        if item.finished:
            self.finished = True
            self._close()
        return item

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._forget(self.request_id, self._stream)
        if not self.finished:
            self._owner._post_abort([self.request_id])

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._close()  # posting an abort only takes the inbox's lock: safe from a finalizer


def _settle(future: asyncio.Future, error: BaseException | None, result=None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
