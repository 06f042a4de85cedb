"""Where each caller's request outputs go: every request has one owner, and only its owner sees it.

Whichever thread steps the engine hands each changed request to its owner's `on_update` (with whether
it is finished, known once per step); the owner's
caller (a `generate`, a `stream`, or `step()` for requests queued with `add_request`) reads them in its
own thread. Updates happen while the stepping thread holds the engine, so an owner needs no lock of
its own beyond what the engine's condition variable gives.
"""

from collections import deque

from nanovllm.engine.request import Request
from nanovllm.outputs import RequestOutput


class StepCollector:
    """The owner of requests queued with `add_request`: `step()` reports them, finished ones in the
    original's `(request id, completion token ids)` form and, for vLLM's interface, every updated
    request's `RequestOutput`."""

    def __init__(self, keep_updates: bool = False):
        self.finished: list[Request] = []
        self.updated: dict[int, Request] = {}
        self.keep_updates = keep_updates  # vLLM's interface: report every updated request

    def on_update(self, request: Request, finished: bool) -> None:
        if self.keep_updates:
            self.updated[request.key] = request
        elif finished:
            self.finished.append(request)

    def has_unreported(self) -> bool:
        return bool(self.finished) or bool(self.updated)

    def take_finished(self) -> list[tuple[int, list[int]]]:
        done, self.finished = self.finished, []
        return [(r.key, r.completions[0].known_tokens()) for r in done]

    def take_outputs(self) -> list[RequestOutput]:
        updated, self.updated = list(self.updated.values()), {}
        return [r.output() for r in updated]


class GenerateCollector:
    """One `generate` call's results, in prompt order, filled as its requests finish."""

    def __init__(self, num_prompts: int, progress=None):
        self.results: list[RequestOutput | None] = [None] * num_prompts
        self.remaining = num_prompts
        self.progress = progress  # a tqdm bar counting finished requests, or None

    def on_update(self, request: Request, finished: bool) -> None:
        if finished and self.results[request.index] is None:
            self.results[request.index] = request.output()
            self.remaining -= 1
            if self.progress is not None:
                self.progress.update(1)

    def done(self) -> bool:
        return self.remaining == 0


class StreamCollector:
    """One `stream` call's incremental results, in the order they were produced."""

    def __init__(self, num_prompts: int):
        self.items: deque[dict] = deque()
        self.remaining = num_prompts

    def on_update(self, request: Request, finished: bool) -> None:
        for completion in request.completions:
            delta = completion.delta()
            if delta is not None:
                self.items.append({"index": request.index, "request_id": request.request_id, **delta})
        if finished:
            self.remaining -= 1

    def ready(self) -> bool:
        return bool(self.items) or self.remaining == 0
