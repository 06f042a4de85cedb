"""Tensor parallelism over worker processes.

Rank 0 is the caller's process; ranks 1..N-1 are spawned here. Every rank joins one process group
("nccl" on CUDA, one GPU per rank at cuda:<rank>; "gloo" on CPU) on a free local TCP port and builds its
own `ModelRunner`, whose layers shard themselves by rank. Rank 0 sends each call (method name and
arguments, pickled) to the workers through a shared-memory segment named uniquely for this engine, and
wakes them with one semaphore each; every rank then runs the same method, so their collectives line up.
Only rank 0 samples (see `ModelRunner.launch`).

Failures never hang the caller: workers report exceptions on a queue and exit (so collectives with them
fail at once), rank 0 checks worker liveness before every call and around every wait, and every wait is
bounded by `Config.tp_timeout_s` (the process group's timeout too). Once a worker has failed, every call
raises a RuntimeError naming the rank; `exit()` still cleans up.

One tensor-parallel engine may be alive per process at a time: torch.distributed's default group is
process-wide, and the layers read their rank and size from it when they are built.
"""

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import struct
import time
import traceback
import uuid
import weakref
from datetime import timedelta
from multiprocessing.shared_memory import SharedMemory

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner

SHM_PREFIX = "nanovllm_tp_"
_HEADER = struct.Struct("<Q")  # length of the pickled message that follows
_POLL_S = 0.05
_JOIN_S = 5.0
_EXIT = "exit"
_JOINED = "nanovllm_tp_joined"

# The live tensor-parallel runner of this process, if any.
_live: "weakref.ref[TensorParallelRunner] | None" = None


def _live_runner() -> "TensorParallelRunner | None":
    runner = _live() if _live is not None else None
    return runner if runner is not None and not runner.closed else None


def check_tp_config(hf_config, tp_size: int, device_type: str = "cpu", device_count: int = 0) -> None:
    """Refuse a model or machine the tensor-parallel layers cannot split `tp_size` ways. The vocabulary
    must divide evenly (it is not padded)."""
    if tp_size == 1:
        return
    heads = hf_config.num_attention_heads
    checks = [
        ("num_attention_heads", heads),
        ("num_key_value_heads", getattr(hf_config, "num_key_value_heads", None) or heads),
        ("vocab_size", hf_config.vocab_size),
        ("intermediate_size", hf_config.intermediate_size),
    ]
    for name, value in checks:
        if value % tp_size:
            raise ValueError(
                f"{name} ({value}) is not divisible by tensor_parallel_size ({tp_size}): "
                "each rank must hold an equal share"
            )
    if device_type == "cuda" and tp_size > device_count:
        raise ValueError(
            f"tensor_parallel_size={tp_size} needs one GPU per rank, but this machine has {device_count}"
        )


def _store(config: Config, port: int, rank: int) -> dist.TCPStore:
    """The rendezvous store on 127.0.0.1: rank 0 hosts it (port 0: the OS picks a free port, so no
    fixed port and no race between picking one and binding it); the workers connect to it."""
    return dist.TCPStore(
        "127.0.0.1",
        port,
        config.tensor_parallel_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=config.tp_timeout_s),
        wait_for_workers=False,
    )


def _init_group(config: Config, device_type: str, store: dist.TCPStore, rank: int) -> None:
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
        store=store,
        world_size=config.tensor_parallel_size,
        rank=rank,
        timeout=timedelta(seconds=config.tp_timeout_s),
    )


def create_model_runner(config: Config):
    """A plain `ModelRunner` for tensor_parallel_size=1, else a `TensorParallelRunner`."""
    live = _live_runner()
    if live is not None:
        raise RuntimeError(
            f"a tensor-parallel engine (tensor_parallel_size={live.world_size}) is alive in this process; "
            "call its exit() before creating another engine (torch.distributed's group is process-wide)"
        )
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return TensorParallelRunner(config)


class TensorParallelRunner:
    """Rank 0's `ModelRunner` plus the workers it drives. Unknown attributes read rank 0's runner."""

    def __init__(self, config: Config):
        global _live
        self.closed = True  # until the workers exist; exit() then has something to do
        self.world_size = n = config.tensor_parallel_size
        self.timeout = float(config.tp_timeout_s)
        device = config.resolve_device()
        device_count = torch.cuda.device_count() if device.type == "cuda" else 0
        check_tp_config(config.hf_config, n, device.type, device_count)
        if device.type == "cuda":
            config.device = "cuda:0"  # rank r uses cuda:r
        worker_config_bytes = pickle.dumps(config)  # before rank 0's runner sizes the cache in it
        self.runner: ModelRunner | None = None
        self._failure: str | None = None
        self._group = False
        ctx = torch_mp.get_context("spawn")
        self._shm = SharedMemory(
            name=f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True, size=config.tp_shm_bytes
        )
        # Semaphores, not Events: Event.set() waits on its sleepers, so it hangs on a killed worker.
        self._events = [ctx.Semaphore(0) for _ in range(n - 1)]  # released: a new message is there
        self._ready = [ctx.Semaphore(1) for _ in range(n - 1)]  # released: the last one was read
        self._queue = ctx.Queue()
        self.processes = []
        self.closed = False
        _live = weakref.ref(self)
        try:
            store = _store(config, 0, 0)
            port = store.port
            for rank in range(1, n):
                p = ctx.Process(
                    target=_worker_main,
                    args=(
                        rank,
                        worker_config_bytes,
                        device.type,
                        port,
                        self._shm.name,
                        self._events[rank - 1],
                        self._ready[rank - 1],
                        self._queue,
                    ),
                    name=f"nanovllm-tp-rank{rank}",
                    daemon=True,
                )
                p.start()
                self.processes.append(p)
            # Wait for every worker to reach the store while watching them, so one that dies while
            # starting is reported at once instead of after the process group's timeout.
            deadline = time.monotonic() + self.timeout
            while store.add(_JOINED, 0) < n - 1:
                self._check_workers()
                if time.monotonic() > deadline:
                    self._failure = f"tensor-parallel workers did not start within {self.timeout:g} s"
                    raise RuntimeError(self._failure)
                time.sleep(_POLL_S)
            try:
                _init_group(config, device.type, store, 0)
            except Exception as e:
                self._check_workers(grace_s=1.0)
                raise RuntimeError(f"tensor-parallel process group did not start: {e}") from e
            self._group = True
            self.runner = ModelRunner(config)
            self._wait_replies("ready")
        except BaseException:
            self.exit()
            raise

    # ---- failure detection -------------------------------------------------------------------

    def _drain_queue(self, replies: dict | None = None, kind: str | None = None) -> None:
        """Record worker errors from the queue; replies of `kind` go into `replies` (a reply that
        arrives while a wait checks on the workers must not be lost)."""
        while True:
            try:
                what, rank, payload = self._queue.get_nowait()
            except (queue_mod.Empty, OSError, EOFError, ValueError):
                return
            if what == "error":
                if self._failure is None:
                    self._failure = f"tensor-parallel worker rank {rank} failed:\n{payload}"
            elif replies is not None and what == kind:
                replies[rank] = payload

    def _check_workers(
        self, grace_s: float = 0.0, replies: dict | None = None, kind: str | None = None
    ) -> None:
        """Raise a RuntimeError naming the failed rank if a worker reported an error or died. With
        `grace_s`, keep looking that long (a worker's death is seen a moment after its socket closes)."""
        deadline = time.monotonic() + grace_s
        while True:
            self._drain_queue(replies, kind)
            if self._failure is None:
                for rank, p in enumerate(self.processes, start=1):
                    if not p.is_alive():
                        self._failure = f"tensor-parallel worker rank {rank} died (exit code {p.exitcode})"
                        break
            if self._failure is not None:
                raise RuntimeError(self._failure)
            if time.monotonic() >= deadline:
                return
            time.sleep(_POLL_S)

    def _wait_replies(self, kind: str) -> dict[int, object]:
        replies: dict[int, object] = {}
        deadline = time.monotonic() + self.timeout
        while len(replies) < self.world_size - 1:
            try:
                what, rank, payload = self._queue.get(timeout=_POLL_S)
            except queue_mod.Empty:
                self._check_workers(replies=replies, kind=kind)
                if time.monotonic() > deadline and len(replies) < self.world_size - 1:
                    missing = sorted(set(range(1, self.world_size)) - set(replies))
                    self._failure = (
                        f"tensor-parallel worker rank(s) {missing} did not answer {kind!r} within "
                        f"{self.timeout:g} s (tp_timeout_s)"
                    )
                    raise RuntimeError(self._failure) from None
                continue
            if what == "error":
                self._failure = f"tensor-parallel worker rank {rank} failed:\n{payload}"
                raise RuntimeError(self._failure)
            if what == kind:
                replies[rank] = payload
        return replies

    # ---- calls -------------------------------------------------------------------------------

    def _send(self, method: str, args: tuple, reply: bool, wait_s: float | None = None) -> None:
        """Put one call in shared memory and wake every worker."""
        if self.closed:
            raise RuntimeError("this tensor-parallel runner has exited")
        self._check_workers()
        data = pickle.dumps((method, args, reply), protocol=pickle.HIGHEST_PROTOCOL)
        size = _HEADER.size + len(data)
        if size > self._shm.size:
            raise ValueError(
                f"a {method!r} call needs {size} bytes of shared memory but the segment has "
                f"{self._shm.size} (tp_shm_bytes): raise tp_shm_bytes"
            )
        deadline = time.monotonic() + (self.timeout if wait_s is None else wait_s)
        for rank, ready in enumerate(self._ready, start=1):
            while not ready.acquire(timeout=_POLL_S):  # the worker has not read the previous message yet
                self._check_workers()
                if time.monotonic() > deadline:
                    self._failure = f"tensor-parallel worker rank {rank} stopped reading calls"
                    raise RuntimeError(self._failure)
        self._shm.buf[: _HEADER.size] = _HEADER.pack(len(data))
        self._shm.buf[_HEADER.size : size] = data
        for event in self._events:
            event.release()

    def _run_local(self, method: str, args: tuple):
        try:
            return getattr(self.runner, method)(*args)
        except Exception as e:
            # A collective with a dead or failed worker errors out: blame the worker if it was one.
            try:
                self._check_workers(grace_s=2.0)
            except RuntimeError as worker_error:
                raise worker_error from e
            if self._failure is None:
                self._failure = f"tensor-parallel rank 0 failed in {method!r}: {e!r}"
            raise

    def call(self, method: str, *args):
        """Run `method(*args)` on every rank's runner; returns the results by rank (rank 0 first)."""
        self._send(method, args, reply=True)
        local = self._run_local(method, args)
        replies = self._wait_replies("result")
        return [local] + [replies[r] for r in range(1, self.world_size)]

    def launch(self, batch, token_bitmask=None):
        self._send("launch", (batch,), reply=False)  # the grammar masks concern rank 0's sampler only
        return self._run_local("launch", (batch,) if token_bitmask is None else (batch, token_bitmask))

    def run(self, batch) -> list[int]:
        return self.launch(batch).tolist()

    def __getattr__(self, name: str):
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    # ---- shutdown ----------------------------------------------------------------------------

    def exit(self) -> None:
        """Stop the workers (terminating any that do not stop), release the model, leave the process
        group and remove the shared memory. Safe to call more than once."""
        global _live
        if self.closed:
            return
        self.closed = True
        try:
            if self._failure is None and self.processes:
                try:
                    self.closed = False
                    self._send(_EXIT, (), reply=False, wait_s=_JOIN_S)
                except Exception:
                    pass
                finally:
                    self.closed = True
            for p in self.processes:
                p.join(_JOIN_S)
            for p in self.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(_JOIN_S)
                if p.is_alive():
                    p.kill()
                    p.join(_JOIN_S)
            if self.runner is not None:
                self.runner.exit()
            if self._group and dist.is_initialized():
                dist.destroy_process_group()
            self._group = False
        finally:
            self._queue.close()
            self._queue.cancel_join_thread()
            self._shm.close()
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            if _live is not None and _live() is self:
                _live = None


def _worker_main(rank, config_bytes, device_type, port, shm_name, event, ready, out_queue) -> None:
    """A worker rank: build this rank's runner, then run the calls rank 0 sends until "exit"."""
    runner = None
    shm = None
    # Ctrl-C in a terminal reaches every process of the group: rank 0 decides what an interrupt means
    # (it finishes the step in flight on every rank, then raises), so a worker must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        config: Config = pickle.loads(config_bytes)
        if device_type == "cuda":
            config.device = f"cuda:{rank}"
        else:  # share the cores with the other ranks instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        shm = SharedMemory(name=shm_name)
        store = _store(config, port, rank)
        store.add(_JOINED, 1)
        _init_group(config, device_type, store, rank)
        runner = ModelRunner(config)
        out_queue.put(("ready", rank, None))
        parent = mp.parent_process()
        while True:
            if not event.acquire(timeout=_POLL_S * 10):
                if parent is not None and not parent.is_alive():
                    break  # rank 0 is gone: nobody will send "exit"
                continue
            (length,) = _HEADER.unpack_from(shm.buf, 0)
            method, args, reply = pickle.loads(bytes(shm.buf[_HEADER.size : _HEADER.size + length]))
            ready.release()
            if method == _EXIT:
                break
            result = getattr(runner, method)(*args)
            if reply:
                out_queue.put(("result", rank, result))
    except BaseException:
        # Report, then leave at once: collectives with this rank then fail fast on the others.
        try:
            out_queue.put(("error", rank, traceback.format_exc()))
            out_queue.close()
            out_queue.join_thread()
        finally:
            os._exit(1)
    try:
        if runner is not None:
            runner.exit()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        if shm is not None:
            shm.close()
