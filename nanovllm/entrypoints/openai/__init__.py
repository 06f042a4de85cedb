"""The OpenAI-compatible HTTP server. It needs the `serve` extra (fastapi, uvicorn, prometheus_client):
importing any module here without them says so."""

import importlib.util

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def _check_serve_extra() -> None:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"the OpenAI server needs the 'serve' extra ({', '.join(missing)} missing): "
            "pip install 'nano-vllm[serve]'"
        )


_check_serve_extra()
