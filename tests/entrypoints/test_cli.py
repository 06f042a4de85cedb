"""The server as a program: `python -m nanovllm.entrypoints.openai.api_server` in a subprocess (its
flags, its routes) and SIGTERM, which lets a stream in flight finish before the process exits 0.
`nanovllm serve --help` lists the engine's flags. Every wait is bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from nanovllm import SamplingParams
from nanovllm.engine.arg_utils import EngineArgs
from nanovllm.entrypoints import cli

START_S = 90.0
EXIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_help_lists_server_and_engine_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--served-model-name",
        "--api-key",
        "--max-concurrent-requests",
        "--uvicorn-log-level",
    ):
        assert flag in out
    import dataclasses

    for f in dataclasses.fields(EngineArgs):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sing"])
    assert e.value.code == 2


def test_subprocess_server_drains_on_sigterm(qwen3_tied, tmp_path):
    from nanovllm import LLM

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "nanovllm.entrypoints.openai.api_server",
        "--model",
        qwen3_tied,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--device",
        "cpu",
        "--num_kvcache_blocks",
        "32",
        "--kvcache-block-size",
        "16",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--uvicorn-log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not start in time"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
        # A stream is running when SIGTERM comes: it still gets every token, then the process exits.
        body = {
            "model": "tiny",
            "prompt": "Hello",
            "max_tokens": 60,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[str] = []
        first = threading.Event()

        def consume():
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(60), "no first chunk"
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive()
        # uvicorn drains, shuts the app (and the engine) down, then re-raises the signal it caught.
        assert proc.wait(EXIT_S) == -signal.SIGTERM, (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert "the engine has shut down" in (tmp_path / "server.log").read_text()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with LLM(
        qwen3_tied,
        device="cpu",
        num_kvcache_blocks=32,
        kvcache_block_size=16,
        max_model_len=256,
        enforce_eager=True,
    ) as llm:
        want = (
            llm.generate(
                ["Hello"], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False
            )[0]
            .outputs[0]
            .text
        )
    assert text == want


def test_a_missing_serve_extra_is_named():
    code = (
        "import importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda name, *a: None if name == 'uvicorn' else real(name, *a); "
        "import nanovllm.entrypoints.openai.api_server"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "uvicorn missing" in r.stderr and "pip install 'nano-vllm[serve]'" in r.stderr
