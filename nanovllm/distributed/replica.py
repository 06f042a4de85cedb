"""One engine replica, the body of a Ray actor: an `LLMEngine` that runs the requests a dispatcher sends
it and streams their results back as they come.

`run` is a generator (a Ray streaming method). Its first item is the engine's request ids of the batch;
every later item is a list of `(position in the batch, result)` pairs, a `RequestOutput` per finished
request (mode "generate") or a `stream()` piece (mode "stream", where `(position, None)` follows a
finished request's last piece); an empty list is a heartbeat, sent at
least every HEARTBEAT_S while requests run, so the dispatcher can tell a slow replica from a lost one.
The actor is threaded: several runs share one continuous batch (the engine is thread-safe), and
`cancel`/`abort` reach a run while it steps.
"""

import os
import threading
from collections import deque
from time import monotonic

from nanovllm.engine.output_collector import StreamCollector
from nanovllm.inputs import ParsedPrompt
from nanovllm.sampling_params import SamplingParams

# Longest a run stays silent while its requests run (a step is never cut short, so this is a floor).
HEARTBEAT_S = 2.0
# Shortest gap between two items of one run: results of consecutive steps travel together.
FLUSH_S = 0.02
# A run's item: (position of the request in the batch, its RequestOutput or stream piece).
Item = tuple[int, object]
# A request as the dispatcher sends it: (text or None, token ids, its sampling parameters).
WorkItem = tuple[str | None, list[int], SamplingParams]


def _drain(items: deque) -> list:
    """Everything in `items`, taken one by one: an abort from another thread may append meanwhile."""
    taken = []
    while items:
        taken.append(items.popleft())
    return taken


class _FinishedCollector:
    """The owner of one run's requests in mode "generate": each finished request's output, once."""

    def __init__(self, num_requests: int):
        self.items: deque[Item] = deque()
        self.remaining = num_requests

    def on_update(self, request, finished: bool) -> None:
        if finished:
            self.items.append((request.index, request.output()))
            self.remaining -= 1  # after the item (see EngineReplica.run)


class _StreamPieces(StreamCollector):
    """`stream()`'s collector, its pieces keyed by the request's position in the batch; a finished
    request's last piece is followed by `(position, None)`."""

    def on_update(self, request, finished: bool) -> None:
        super().on_update(request, False)  # the pieces; the count goes down below, after the marker
        if finished:
            self.items.append({"index": request.index, "request_finished": True})
            self.remaining -= 1

    def take(self) -> list[Item]:
        return [(p["index"], None if "request_finished" in p else p) for p in _drain(self.items)]


class EngineReplica:
    """An LLMEngine in a Ray actor (made remote by the dispatcher, so Ray stays an optional import)."""

    def __init__(self, model: str, engine_kwargs: dict):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from nanovllm.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(model, **engine_kwargs)
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self.requests_run = 0  # requests this replica has been sent (all runs)

    def info(self) -> dict:
        """Where this replica runs and what its KV cache holds (for the dispatcher's checks)."""
        import ray

        return {
            "num_kvcache_blocks": self.engine.block_manager.num_blocks,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": ray.get_gpu_ids(),
            "requests_run": self.requests_run,
        }

    def check(self, requests: list[tuple[int, SamplingParams]]) -> list[SamplingParams] | Exception:
        """The engine's own checks of each request's (number of prompt tokens, sampling parameters), as
        `generate` runs them before queueing: the engine's copies of the parameters (an unseeded request
        gets its seed here when the engine has one, in order), or the first ValueError/TypeError
        (returned, not raised, so the caller gets it without Ray's wrapping)."""
        engine = self.engine
        checked = []
        try:
            for num_prompt_tokens, params in requests:
                checked.append(engine.validate_request(params, num_prompt_tokens))
        except (ValueError, TypeError) as e:
            return e
        return checked

    def run(self, run_id: int, work: list[WorkItem], mode: str):
        """Queue `work` (validated again by the engine) and yield its results as they come (module
        docstring). `cancel(run_id)` aborts what is left and ends the run."""
        engine = self.engine
        parsed = [ParsedPrompt(text, token_ids) for text, token_ids, _ in work]
        collector = _StreamPieces(len(work)) if mode == "stream" else _FinishedCollector(len(work))
        # The engine's own batch entry point (as generate/stream): validates every request, then queues.
        requests = engine.add_requests(parsed, [params for _, _, params in work], collector)
        with self._lock:
            self.requests_run += len(requests)
        yield [request.request_id for request in requests]
        last = monotonic()

        def ready() -> bool:
            if collector.remaining == 0 or run_id in self._cancelled:
                return True
            now = monotonic()
            return now - last >= HEARTBEAT_S or (bool(collector.items) and now - last >= FLUSH_S)

        try:
            while True:
                engine.run_until(ready)
                if run_id in self._cancelled:
                    engine.abort_owned_requests(requests)
                    return
                # Read the count first: a request's items are queued before it counts as finished (an abort
                # from another thread may finish one while this thread drains).
                all_done = collector.remaining == 0
                items = collector.take() if isinstance(collector, _StreamPieces) else _drain(collector.items)
                last = monotonic()
                yield items
                if all_done:
                    return
        except BaseException:
            engine.abort_owned_requests(requests)
            raise
        finally:
            with self._lock:
                self._cancelled.discard(run_id)

    def cancel(self, run_id: int) -> None:
        """End run `run_id` after the step in progress, aborting its unfinished requests."""
        with self._lock:
            self._cancelled.add(run_id)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by the engine's ids (a run gets them back finished with "abort")."""
        self.engine.abort_request(request_ids)

    def exit(self) -> None:
        """Release the engine (its KV cache, weights and tensor-parallel workers)."""
        self.engine.exit()
