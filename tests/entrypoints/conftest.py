"""A real uvicorn server on 127.0.0.1 (a thread of the test process, one per module) serving a tiny
random-weight model, with the offline LLM on the same checkpoint as the reference."""

import socket
import threading
import time
from dataclasses import dataclass

import pytest

from nanovllm import LLM
from nanovllm.engine.async_llm import AsyncLLM
from nanovllm.engine.llm_engine import LLMEngine

ENGINE_CONFIG = dict(
    kvcache_block_size=16,
    num_kvcache_blocks=96,
    max_model_len=512,
    max_num_seqs=64,
    enforce_eager=True,
    device="cpu",
)
MODEL_NAME = "tiny"
API_KEY = "sk-test-key"
START_S = 60.0  # the server must be up by then


@dataclass
class ServerHandle:
    url: str  # http://127.0.0.1:PORT
    engine: AsyncLLM
    settings: object
    app: object

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def assert_idle(self, timeout: float = 10.0) -> None:
        """Every request finished and every KV block free (waits for the engine thread to get there)."""
        inner = self.engine.engine
        deadline = time.monotonic() + timeout
        while inner.get_num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = inner.get_stats()
        assert inner.get_num_unfinished_requests() == 0
        assert stats.num_free_kv_blocks == stats.num_kv_blocks, stats
        with inner._exclusive():
            inner.block_manager.check_integrity()


def start_server(model: str, **settings_overrides):
    import uvicorn

    from nanovllm.entrypoints.openai.api_server import build_app
    from nanovllm.entrypoints.openai.serving_engine import ServerSettings

    engine = AsyncLLM(LLMEngine(model, **ENGINE_CONFIG))
    settings = ServerSettings(served_model_names=[MODEL_NAME, "alias"], api_key=API_KEY)
    for k, v in settings_overrides.items():
        setattr(settings, k, v)
    app = build_app(engine, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, sock, ServerHandle(f"http://127.0.0.1:{port}", engine, settings, app)


@pytest.fixture(scope="module")
def server(qwen3_tied):
    srv, thread, sock, handle = start_server(qwen3_tied)
    yield handle
    srv.should_exit = True
    thread.join(30)
    sock.close()
    assert not thread.is_alive(), "the server did not stop"
    assert not handle.engine._thread.is_alive(), "the engine thread did not stop"


@pytest.fixture(scope="module")
def reference(qwen3_tied):
    llm = LLM(qwen3_tied, **ENGINE_CONFIG)
    yield llm
    llm.exit()
