"""Prometheus metrics with vLLM's names (`vllm:...`, labelled by `model_name`), in a registry of the
server's own (two servers in one process do not share counters).

Gauges are read from the engine when /metrics is scraped; counters and histograms follow each
request's updates (`ServerMetrics.track`) and each engine step (`ServerMetrics.on_step`).
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanovllm.engine.async_llm import RequestUpdate, StepRecord
from nanovllm.engine.llm_engine import EngineStats

# Histogram buckets (seconds), as vLLM's.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
# Tokens per engine step.
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests with a sequence in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.")
        self.kv_blocks = gauge("nanovllm:num_kv_cache_blocks", "KV-cache blocks in the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of the requests admitted.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self._success = Counter(
            "vllm:request_success",
            "Requests finished, by finish reason.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS)
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Time between two updates of a request.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Tokens per engine step.", ITERATION_BUCKETS
        )
        self.rejected = counter("nanovllm:requests_rejected", "Requests refused with 503 (over the limit).")
        self.model_name = model_name

    def on_step(self, step: StepRecord) -> None:
        """Called by the engine thread after each step."""
        self.iteration_tokens.observe(step.num_tokens)

    def render(self, stats: EngineStats) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks.set(stats.num_kv_blocks)
        return generate_latest(self.registry)

    def track(self, updates, num_prompt_tokens: int) -> "TrackedStream":
        """A request's updates passed through, counting its tokens and timing them."""
        self.prompt_tokens.inc(num_prompt_tokens)
        return TrackedStream(self, updates)


class TrackedStream:
    """A `RequestStream` whose updates feed the metrics; `aclose()` closes (aborts) the request too,
    iterated or not, and counts it once in `vllm:request_success_total`."""

    def __init__(self, metrics: ServerMetrics, updates):
        self._metrics = metrics
        self._updates = updates
        self._arrival = time.monotonic()
        self._first = True
        self._last: dict[int, float] = {}  # per completion, when its latest tokens came
        self._reason = "abort"  # what a request left early (a closed stream, a cancelled task) counts as
        self._counted = False

    def __aiter__(self) -> "TrackedStream":
        return self

    async def __anext__(self) -> RequestUpdate:
        try:
            update = await self._updates.__anext__()
        except BaseException:
            self._count()
            raise
        m = self._metrics
        for c in update.completions:
            k = len(c.token_ids)
            if c.index == 0 and c.finish_reason is not None:
                self._reason = c.finish_reason
            if not k:
                continue
            m.generation_tokens.inc(k)
            if self._first:
                m.ttft.observe(max(0.0, update.time - self._arrival))
                self._first = False
            # One inter-token latency per token after a completion's first: tokens that came together
            # (two steps read back at once) share the gap since its previous ones.
            if c.index in self._last:
                gaps, gap = k, max(0.0, update.time - self._last[c.index]) / k
            else:
                gaps, gap = k - 1, 0.0
            for _ in range(gaps):
                m.itl.observe(gap)
            self._last[c.index] = update.time
        if update.finished:
            m.e2e.observe(max(0.0, update.time - self._arrival))
            self._count()
        return update

    def _count(self) -> None:
        if not self._counted:
            self._counted = True
            # One count per request (as vLLM), under its first completion's finish reason.
            self._metrics._success.labels(self._metrics.model_name, self._reason).inc()

    async def aclose(self) -> None:
        self._count()
        await self._updates.aclose()
