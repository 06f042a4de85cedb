"""`LLM(model, data_parallel_size=N, ...)`: N engine replicas as Ray actors behind the same `generate`,
`stream` and `chat` as one engine.

The driver (this object) validates and tokenizes every request with the engine's own checks before
anything is sent, draws the seeds of unseeded requests from the engine seed in prompt order as one
engine would (so outputs do not depend on which replica runs a request), and hands the call to a
`Dispatch` (dispatcher.py). Each replica is an actor in a placement group of its own that holds all of
its `tensor_parallel_size` devices on one node (placement.py); on a cluster without GPUs, or with
`device="cpu"`, replicas take CPUs. The cluster is the one this process is connected to, else
`ray.init()`'s (RAY_ADDRESS, else a local instance).
"""

import atexit
import functools
import itertools
import threading
import weakref
from collections.abc import Iterator
from uuid import uuid4

from tqdm.auto import tqdm

from nanovllm.config import make_config
from nanovllm.distributed.balance import request_cost
from nanovllm.distributed.dispatcher import Dispatch, Replica, why_lost
from nanovllm.distributed.placement import place_replicas, remove_groups, replica_resources
from nanovllm.distributed.ray_utils import connect, import_ray, uses_gpus
from nanovllm.distributed.replica import EngineReplica, WorkItem
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.inputs import ParsedPrompt, parse_prompts, prompt_token_ids
from nanovllm.models.registry import check_model_config
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams, params_per_prompt
from nanovllm.utils.generation_config import default_sampling_params, eos_token_ids
from nanovllm.utils.tokenizer import load_tokenizer

# Longest wait for the cluster to reserve every replica's devices.
PLACEMENT_TIMEOUT_S = 120.0
# Longest wait for one replica to start: load the model, size its KV cache, capture CUDA graphs.
STARTUP_TIMEOUT_S = 900.0
# A replica that sends nothing (it heartbeats while it runs requests) for this long is taken as lost.
REPLICA_TIMEOUT_S = 300.0
# Longest wait at exit() for the replicas to release their engines before they are killed anyway.
EXIT_TIMEOUT_S = 30.0
# Calls one replica actor serves at once: the runs of concurrent generate/stream calls, reruns of a lost
# replica's requests, and cancel/abort, which must reach a replica while it steps.
MAX_REPLICA_CONCURRENCY = 16


def _exit_if_alive(llm: "weakref.ref[DataParallelLLM]") -> None:
    if (alive := llm()) is not None:
        alive.exit()


class DataParallelLLM:
    """What `LLM(model, data_parallel_size=N > 1, ...)` returns (module docstring). Other keywords are
    the engine's, given to every replica."""

    # The engine's chat templating runs on the driver over the same attributes (tokenizer; generate), as
    # do its checks of token ids and lengths (prompt_token_ids); the sampling checks run on a replica.
    chat = LLMEngine.chat

    def __init__(self, model: str | None = None, **kwargs):
        config = make_config(model, kwargs)  # every keyword validated before Ray is touched
        check_model_config(config.hf_config, config.max_model_len)
        if config.device.startswith("cuda:"):
            raise ValueError(
                f"device={config.device!r} names one GPU; with data_parallel_size > 1 Ray gives each replica "
                "its own GPUs: use 'cuda' or 'auto'"
            )
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self._default_params = default_sampling_params(config.model)
        config.eos_token_ids = eos_token_ids(self.tokenizer, config.model, config.hf_config)
        self.vocab_size = config.hf_config.vocab_size
        self._lock = threading.Lock()  # request ids, placements and aborts of concurrent calls
        self._request_ids = itertools.count()
        self._run_ids = itertools.count()
        self._placed: dict[str, tuple[Replica, str]] = {}  # unfinished request id -> (replica, engine id)
        self._aborted: set[str] = set()  # request ids aborted before their replica named them
        self._active: set[str] = set()  # request ids of the calls in progress
        self.replica_timeout_s = REPLICA_TIMEOUT_S
        self._exited = True  # until the replicas are up
        self._groups: list = []
        self.replicas: list[Replica] = []

        ray = self._ray = import_ray()
        connect(ray)
        use_gpus = uses_gpus(ray, config.device)
        resources = replica_resources(config.tensor_parallel_size, use_gpus)
        engine_kwargs = dict(kwargs, data_parallel_size=1, device="cuda" if use_gpus else "cpu")
        self._groups = place_replicas(ray, config.data_parallel_size, resources, PLACEMENT_TIMEOUT_S)
        try:
            self.replicas = self._start_replicas(
                model if model is not None else config.model, engine_kwargs, resources
            )
        except BaseException:
            remove_groups(self._groups)
            raise
        self._exited = False
        self._exit_hook = functools.partial(_exit_if_alive, weakref.ref(self))
        atexit.register(self._exit_hook)

    def _start_replicas(self, model: str, engine_kwargs: dict, resources) -> list[Replica]:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(EngineReplica)
        tag = uuid4().hex[:8]
        actors = [
            actor_cls.options(
                name=f"nanovllm-replica-{tag}-{i}",
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                max_concurrency=MAX_REPLICA_CONCURRENCY,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
            ).remote(model, engine_kwargs)
            for i, group in enumerate(self._groups)
        ]
        refs = [actor.info.remote() for actor in actors]
        try:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STARTUP_TIMEOUT_S)
            infos = []
            for i, ref in enumerate(refs):
                if ref not in ready:
                    raise RuntimeError(f"replica {i} did not start within {STARTUP_TIMEOUT_S:g} s")
                try:
                    infos.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    raise RuntimeError(f"replica {i} failed to start: {e}") from None
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        return [Replica(i, actor, info) for i, (actor, info) in enumerate(zip(actors, infos))]

    # ---- lifecycle ---------------------------------------------------------------------------

    def exit(self) -> None:
        """Release every replica's engine, kill the actors and free their placement groups (their GPUs);
        safe to call more than once. A local Ray instance this LLM started keeps running (as in vLLM;
        `cleanup_dist_env_and_memory(shutdown_ray=True)` stops it)."""
        with self._lock:
            if self._exited:
                return
            self._exited = True
        atexit.unregister(self._exit_hook)
        ray = self._ray
        if not ray.is_initialized():  # Ray was shut down first: the actors went with it
            return
        live = [r for r in self.replicas if r.lost is None]
        refs = [r.actor.exit.remote() for r in live]
        ray.wait(refs, num_returns=len(refs), timeout=EXIT_TIMEOUT_S)
        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # already gone
                pass
        remove_groups(self._groups)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.exit()

    def _check_alive(self) -> None:
        if self._exited:
            raise RuntimeError("this engine has exited; create a new LLM to generate again")

    @property
    def replica_actors(self) -> list:
        """The Ray actor handles of the replicas still serving."""
        return [r.actor for r in self.replicas if r.lost is None]

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self._default_params.clone()

    # ---- requests ----------------------------------------------------------------------------

    def _prepare(self, parsed: list[ParsedPrompt], sampling_params) -> tuple[list[WorkItem], list[str]]:
        """Every request checked as one engine checks it before anything is sent (a bad one: nothing
        is); returns the work and the request ids."""
        params = params_per_prompt(sampling_params, self._default_params, len(parsed))
        max_model_len = self.config.max_model_len
        token_ids = [prompt_token_ids(p, self.tokenizer, self.vocab_size, max_model_len) for p in parsed]
        checked = self._check_params([(len(ids), sp) for ids, sp in zip(token_ids, params)])
        work: list[WorkItem] = [(p.text, ids, sp) for p, ids, sp in zip(parsed, token_ids, checked)]
        with self._lock:
            ids = [str(next(self._request_ids)) for _ in work]
            self._active.update(ids)
        return work, ids

    def _check_params(self, requests: list[tuple[int, SamplingParams]]) -> list[SamplingParams]:
        """The engine's sampling checks (values, vocabulary, KV-cache fit, grammars), run by the replica
        with the smallest KV cache (so what passes fits on every replica); it also draws the seeds of
        unseeded requests from the engine seed, in prompt order, as one engine would. Sends no work."""
        ray = self._ray
        if not requests:
            return []
        if any(not isinstance(sp, SamplingParams) for _, sp in requests):
            bad = next(sp for _, sp in requests if not isinstance(sp, SamplingParams))
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(bad).__name__}")
        while True:
            live = [r for r in self.replicas if r.lost is None]
            if not live:
                lost = "; ".join(f"{r.name}: {r.lost}" for r in self.replicas)
                raise RuntimeError(f"every replica of this LLM has been lost ({lost}); create a new LLM")
            checker = min(live, key=lambda r: (r.info["num_kvcache_blocks"], r.index))
            try:
                result = ray.get(checker.actor.check.remote(requests), timeout=self.replica_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                checker.lost = why_lost(e)
                ray.kill(checker.actor, no_restart=True)
                continue
            if isinstance(result, Exception):
                raise result
            return result

    def _dispatch(self, work: list[WorkItem], ids: list[str], mode: str) -> Iterator[tuple[int, object]]:
        max_len = self.config.max_model_len
        costs = [request_cost(len(token_ids), params, max_len) for _, token_ids, params in work]
        call = Dispatch(
            self._ray,
            self.replicas,
            work,
            costs,
            ids,
            mode,
            self._run_ids,
            self.replica_timeout_s,
            self._on_placed,
        )
        try:
            call.start()
            yield from call.results()
        finally:
            call.cancel()
            with self._lock:
                for rid in ids:
                    self._placed.pop(rid, None)
                    self._aborted.discard(rid)
                    self._active.discard(rid)

    def _on_placed(self, request_id: str, replica: Replica, engine_id: str) -> None:
        with self._lock:
            self._placed[request_id] = (replica, engine_id)
            aborted = request_id in self._aborted
        if aborted:
            replica.actor.abort.remote([engine_id])

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """As `LLM.generate`: one `RequestOutput` per prompt, in prompt order, the requests run on the
        replicas."""
        self._check_alive()
        work, ids = self._prepare(parse_prompts(prompts), sampling_params)
        results: list[RequestOutput | None] = [None] * len(work)
        with tqdm(total=len(work), desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as pbar:
            for pos, out in self._dispatch(work, ids, "generate"):
                results[pos] = out
                pbar.update(1)
        return results

    def stream(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> Iterator[dict]:
        """As `LLM.stream`: pieces as the replicas make them, `index` the prompt's position; closing the
        iterator early aborts what is left."""
        self._check_alive()
        work, ids = self._prepare(parse_prompts(prompts), sampling_params)
        for _, piece in self._dispatch(work, ids, "stream"):
            yield piece

    def abort_request(self, request_id: str | list[str]) -> None:
        """Abort requests by the ids `generate`/`stream` gave them (unknown or finished ones are
        ignored); the caller gets them back with finish_reason "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        by_replica: dict[int, tuple[Replica, list[str]]] = {}
        with self._lock:
            for rid in ids:
                if rid in self._placed:
                    replica, engine_id = self._placed[rid]
                    by_replica.setdefault(replica.index, (replica, []))[1].append(engine_id)
                elif rid in self._active:
                    self._aborted.add(rid)
        for replica, engine_ids in by_replica.values():
            replica.actor.abort.remote(engine_ids)

    def add_request(self, *args, **kwargs):
        raise NotImplementedError(
            "add_request/step are not offered with data_parallel_size > 1: use generate, stream or chat"
        )

    step = add_request
