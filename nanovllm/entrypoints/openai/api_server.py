"""The OpenAI-compatible HTTP server (FastAPI + uvicorn), as vLLM's:

    python -m nanovllm.entrypoints.openai.api_server --model MODEL [--port 8000] [engine flags]
    nanovllm serve MODEL ...                                  # the same (nanovllm/entrypoints/cli.py)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics,
POST /tokenize, POST /detokenize (and /version). With --api-key every /v1 route needs
`Authorization: Bearer KEY`. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in
flight finish and shuts the engine down; then uvicorn ends the process by that signal again (exit
status -15 for SIGTERM).
"""

import argparse
import asyncio
import contextlib
import logging
import secrets
from importlib.metadata import PackageNotFoundError, version

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm.engine.arg_utils import EngineArgs
from nanovllm.engine.async_llm import AsyncLLM
from nanovllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from nanovllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from nanovllm.entrypoints.openai.serving_chat import OpenAIServingChat, render_chat
from nanovllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from nanovllm.entrypoints.openai.serving_engine import OpenAIError, ServerSettings, StreamingBody
from nanovllm.utils.argparse_utils import FlexibleArgumentParser

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000


def _package_version() -> str:
    try:
        return version("nano-vllm")
    except PackageNotFoundError:
        return "unknown"


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always ends its body (`StreamingBody.close`) when the response ends,
    however it ends: a client that went away mid-stream aborts its requests at once."""

    def __init__(self, body: StreamingBody):
        super().__init__(body.chunks, media_type="text/event-stream")
        self._body = body

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.close()


async def _unless_disconnected(raw: Request, work):
    """Run `work` (a coroutine) unless the client disconnects first; then cancel it (which aborts its
    engine requests) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("client disconnected: request cancelled")
    return None


def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `engine`. Shutting the app down (its lifespan's end) shuts the engine."""
    metrics = ServerMetrics(settings.served_model_names[0])
    engine.on_step = metrics.on_step
    completion = OpenAIServingCompletion(engine, settings, metrics)
    chat = OpenAIServingChat(engine, settings, metrics)
    config = engine.engine.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown)
        logger.info("the engine has shut down")

    app = FastAPI(title="nano-vllm OpenAI-compatible server", version=_package_version(), lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    def error_response(error: OpenAIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(OpenAIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException):
        return error_response(OpenAIError(exc.status_code, str(exc.detail)))

    async def check_api_key(raw: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = raw.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise OpenAIError(401, "invalid or missing API key: send Authorization: Bearer <key>")

    v1 = [Depends(check_api_key)]

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return JSONResponse(OpenAIError(503, "the engine is not running").body(), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def show_version():
        return {"version": _package_version()}

    @app.get("/metrics")
    async def show_metrics():
        stats = await engine.get_stats()
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=v1)
    async def show_models():
        cards = [
            ModelCard(id=name, root=config.model, max_model_len=config.max_model_len)
            for name in settings.served_model_names
        ]
        return ModelList(data=cards).model_dump()

    async def respond(raw: Request, create):
        result = await _unless_disconnected(raw, create)
        if result is None:
            return Response(status_code=499)  # nobody is listening any more
        if isinstance(result, dict):
            return JSONResponse(result)
        return _ClosingStreamingResponse(result)

    @app.post("/v1/completions", dependencies=v1)
    async def create_completion(request: CompletionRequest, raw: Request):
        return await respond(raw, completion.create(request))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
        return await respond(raw, chat.create(request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        completion.check_model(request.model)
        tokenizer = engine.tokenizer
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError(400, "give exactly one of prompt and messages", "prompt")
        if request.messages is not None:
            text = render_chat(tokenizer, request, request.messages)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        completion.check_model(request.model)
        vocab = engine.engine.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": engine.tokenizer.decode(request.tokens)}

    return app


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's flags, then every engine flag (EngineArgs)."""
    server = parser.add_argument_group("server arguments")
    server.add_argument("--host", default="0.0.0.0", help="Address to listen on (default: %(default)s).")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port (default: %(default)s).")
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="Model name(s) clients use in the `model` field; the first is reported in responses "
        "(default: the --model argument).",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help="Require `Authorization: Bearer KEY` on every /v1 route (default: none).",
    )
    server.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=0,
        help="Most engine requests (prompts) in flight at once; a request that would go over gets 503 "
        "(default: %(default)s, no limit).",
    )
    server.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: %(default)s).",
    )
    EngineArgs.add_cli_args(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    if args.max_concurrent_requests < 0:
        raise ValueError(f"--max-concurrent-requests must be >= 0, got {args.max_concurrent_requests}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    return ServerSettings(
        served_model_names=args.served_model_name or [args.model],
        max_concurrent_requests=args.max_concurrent_requests,
        api_key=args.api_key,
    )


def run_server(args: argparse.Namespace) -> None:
    """Load the engine, then serve until SIGTERM/SIGINT (uvicorn drains the requests in flight)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    app = build_app(engine, settings)
    logger.info(
        "serving %s as %s on http://%s:%d", args.model, settings.served_model_names, args.host, args.port
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(FlexibleArgumentParser(description="nano-vllm's OpenAI-compatible server"))
    run_server(parser.parse_args(argv))


if __name__ == "__main__":
    main()
