"""What the completion and chat routes share: the served model names, turning a request's fields into
`SamplingParams`, the admission limit, log-probability formatting, merging the updates of several
prompts, and the HTTP errors (OpenAI's body: `{"error": {"message", "type", "param", "code"}}`)."""

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii as json_str  # json.dumps of a str, as it writes one

from nanovllm.engine.async_llm import AsyncLLM, RequestUpdate
from nanovllm.entrypoints.openai.metrics import ServerMetrics
from nanovllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, random_id
from nanovllm.outputs import Logprob
from nanovllm.sampling_params import SamplingParams, StructuredOutputsParams

# HTTP status -> the error `type` in the body (vLLM's names).
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# "SamplingParams.top_p must be ..." names the field: report it as the error's `param`.
_FIELD_IN_MESSAGE = re.compile(r"\b(?:SamplingParams|StructuredOutputsParams)\.(\w+)")


class OpenAIError(Exception):
    """An error the client gets as an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        info = ErrorInfo(
            message=self.message,
            type=ERROR_TYPES.get(self.status, "Error"),
            param=self.param,
            code=self.status,
        )
        return ErrorResponse(error=info).model_dump()

    @classmethod
    def bad_input(cls, error: Exception) -> "OpenAIError":
        """A 400 from the engine's ValueError/TypeError, with the field it names as `param`."""
        message = str(error)
        found = _FIELD_IN_MESSAGE.search(message)
        return cls(400, message, found.group(1) if found else None)


@dataclasses.dataclass(slots=True)
class ServerSettings:
    """The server's own options (beside the engine's)."""

    served_model_names: list[str]
    max_concurrent_requests: int = 0  # engine requests (prompts) in flight at once; 0: no limit
    api_key: str | None = None


class OpenAIServing:
    """The base of the completion and chat handlers."""

    def __init__(self, engine: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.default_params = engine.engine.get_default_sampling_params()
        self._in_flight = 0  # engine requests admitted and not yet finished (event loop only)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.settings.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "model")

    def admit(self, num_requests: int) -> "Ticket":
        """Hold `num_requests` of the concurrency limit until the ticket is released; 503 when they do
        not fit."""
        limit = self.settings.max_concurrent_requests
        if limit and self._in_flight + num_requests > limit:
            self.metrics.rejected.inc()
            raise OpenAIError(
                503,
                f"the server is at its limit of {limit} concurrent requests ({self._in_flight} in flight, "
                f"this one needs {num_requests}); try again later",
            )
        self._in_flight += num_requests
        return Ticket(self, num_requests)

    # ---- sampling parameters ------------------------------------------------------------------

    def sampling_params(
        self,
        request: SamplingRequest,
        num_prompt_tokens: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
    ) -> SamplingParams:
        """The request's SamplingParams over the model's defaults; 400 for a bad value."""
        room = self.max_model_len - num_prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise OpenAIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                    f"{num_prompt_tokens}, which leaves no room for a completion.",
                    "messages" if hasattr(request, "messages") else "prompt",
                )
            max_tokens = min(self.default_params.max_tokens, room)
        elif max_tokens > room:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        fields = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "repetition_penalty": request.repetition_penalty,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        overrides = {name: value for name, value in fields.items() if value is not None}
        overrides.update(
            n=request.n,
            seed=request.seed,
            stop=request.stop or None,
            stop_token_ids=request.stop_token_ids,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            allowed_token_ids=request.allowed_token_ids,
            bad_words=request.bad_words,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else request.prompt_logprobs,
            logit_bias=_logit_bias(request.logit_bias),
            structured_outputs=_structured_outputs(request),
        )
        base = {
            f.name: getattr(self.default_params, f.name) for f in dataclasses.fields(SamplingParams) if f.init
        }
        try:
            return SamplingParams(**(base | overrides))
        except (ValueError, TypeError) as e:
            raise OpenAIError.bad_input(e) from None

    # ---- running requests ------------------------------------------------------------------------

    async def start(
        self, request_id: str, prompt: dict, params: SamplingParams
    ) -> AsyncIterator[RequestUpdate]:
        """Queue one prompt; 400 for what the engine refuses, the metrics following its updates."""
        try:
            updates = await self.engine.add_request(request_id, prompt, params)
        except (ValueError, TypeError) as e:
            raise OpenAIError.bad_input(e) from None
        except RuntimeError as e:  # the engine is shutting down or dead
            raise OpenAIError(503, str(e)) from None
        return self.metrics.track(updates, len(prompt["prompt_token_ids"]))

    async def start_all(
        self, base_id: str, prompts: list[dict], params: list[SamplingParams]
    ) -> list[AsyncIterator[RequestUpdate]]:
        """Queue every prompt (request ids base_id-0, -1, ...); if one is refused, abort the others."""
        started: list[AsyncIterator[RequestUpdate]] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                started.append(await self.start(f"{base_id}-{i}", prompt, sp))
        except BaseException:
            for updates in started:
                await updates.aclose()
            raise
        return started

    def request_id(self, request: SamplingRequest, prefix: str) -> str:
        return request.request_id or random_id(prefix)


@dataclasses.dataclass(slots=True)
class StreamingBody:
    """A streamed response: its SSE lines and what `close()` ends whatever happened (the requests
    aborted if unfinished, the concurrency ticket released), even if the lines were never read."""

    chunks: AsyncIterator[str]
    streams: list
    ticket: "Ticket"

    async def close(self) -> None:
        await self.chunks.aclose()
        for stream in self.streams:
            await stream.aclose()
        self.ticket.release()


class Ticket:
    """Requests counted against the concurrency limit; `release()` (idempotent) gives them back."""

    def __init__(self, serving: OpenAIServing, num: int):
        self._serving, self._num = serving, num

    def release(self) -> None:
        self._serving._in_flight -= self._num
        self._num = 0


async def merge(streams: list[AsyncIterator[RequestUpdate]]) -> AsyncIterator[tuple[int, RequestUpdate]]:
    """The updates of several requests as they come, as (position in `streams`, update). Closing the
    merged iterator closes (aborts) every request still running."""
    if len(streams) == 1:
        try:
            async for update in streams[0]:
                yield 0, update
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestUpdate]) -> None:
        try:
            async for update in stream:
                await queue.put((i, update))
            await queue.put((i, done))
        except BaseException as e:
            await queue.put((i, e))
            raise
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise OpenAIError(
            400, f"logit_bias keys must be token ids (integers as strings), got {sorted(bias)}", "logit_bias"
        ) from None


def _structured_outputs(request: SamplingRequest) -> StructuredOutputsParams | None:
    """`response_format` (OpenAI's) or `structured_outputs` (vLLM's) as StructuredOutputsParams."""
    fmt, so = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise OpenAIError(400, "give response_format or structured_outputs, not both", "response_format")
    try:
        if so is not None:
            return StructuredOutputsParams(
                json=so.json_,
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=so.json_object,
                disable_any_whitespace=so.disable_any_whitespace,
            )
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise OpenAIError(
                400, "response_format of type json_schema needs json_schema.schema", "response_format"
            )
        return StructuredOutputsParams(json=fmt.json_schema.json_schema)
    except ValueError as e:
        raise OpenAIError(400, str(e), "response_format" if so is None else "structured_outputs") from None


def json_value(value) -> str:
    """`json.dumps(value)`; strings and None (a chunk's text and reasons) without its generic encoder."""
    if value is None:
        return "null"
    if type(value) is str:
        return json_str(value)
    return json.dumps(value)


def stream_choice(
    index: int, text: str, logprobs: dict | None, finish_reason, stop_reason, chat: bool = False
) -> str:
    """One choice of a streamed chunk as JSON: json.dumps's output for {"index", "text" (chat:
    "delta": {"content"}), "logprobs", "finish_reason", "stop_reason"}, written directly (this runs for
    every request at every step)."""
    member = f'"delta": {{"content": {json_str(text)}}}' if chat else f'"text": {json_str(text)}'
    lp = "null" if logprobs is None else json.dumps(logprobs)
    return (
        f'{{"index": {index}, {member}, "logprobs": {lp}, '
        f'"finish_reason": {json_value(finish_reason)}, "stop_reason": {json_value(stop_reason)}}}'
    )


class SSEChunks:
    """The server-sent events of one streamed response: `data: {"id", "object", "created", "model",
    "choices": [...], "usage"?}` lines, byte for byte what json.dumps writes for that dict, with the
    fixed start written once. Choices come already in JSON (`json_value` and f-strings for the common
    ones): a stream makes a line per request per engine step, and json.dumps of the whole dict was
    most of that line's cost."""

    def __init__(self, request_id: str, object_name: str, created: int, model: str):
        self.head = (
            f'data: {{"id": {json_str(request_id)}, "object": {json_str(object_name)}, '
            f'"created": {json.dumps(created)}, "model": {json_str(model)}, "choices": ['
        )

    def line(self, choices: list[str], usage: dict | None = None) -> str:
        tail = "]}\n\n" if usage is None else f'], "usage": {json.dumps(usage)}}}\n\n'
        return self.head + ", ".join(choices) + tail


def token_text(tokenizer, token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def top_by_rank(entries: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The `num` most likely tokens of one position, most likely first."""
    ranked = [(t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= num]
    return sorted(ranked, key=lambda item: item[1].rank)[:num]
