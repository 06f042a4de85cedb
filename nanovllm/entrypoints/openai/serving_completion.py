"""POST /v1/completions: one or more prompts (text or token ids), `n` completions each, whole or
streamed as server-sent events. Choice `i * n + j` is completion j of prompt i, as in vLLM."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from nanovllm.engine.async_llm import CompletionDelta
from nanovllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
)
from nanovllm.entrypoints.openai.serving_engine import (
    OpenAIError,
    OpenAIServing,
    SSEChunks,
    StreamingBody,
    merge,
    stream_choice,
    token_text,
)
from nanovllm.outputs import Logprob

# OpenAI's limit on `logprobs` for completions is 5; vLLM allows more (up to its max_logprobs, 20).
MAX_LOGPROBS = 20


class _Choice:
    """One completion being assembled (text, tokens, log-probabilities)."""

    def __init__(self):
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs = CompletionLogprobs()
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class OpenAIServingCompletion(OpenAIServing):
    def prompts(self, request: CompletionRequest) -> list[dict]:
        """The request's prompts as engine prompts ({"prompt"?, "prompt_token_ids"})."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]  # one prompt of token ids
        else:
            items = list(prompt)
        if not items:
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item)
                out.append({"prompt": item, "prompt_token_ids": ids})
            else:
                out.append({"prompt_token_ids": list(item)})
            if not out[-1]["prompt_token_ids"]:
                raise OpenAIError(400, "a prompt is empty: at least one token is needed", "prompt")
        return out

    async def create(self, request: CompletionRequest):
        """The response body (a dict) or, with `stream`, an iterator of SSE lines."""
        self.check_model(request.model)
        if request.suffix is not None:
            raise OpenAIError(400, "suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError(400, "best_of is not supported (nor by vLLM's V1 engine)", "best_of")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(
                400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}", "logprobs"
            )
        prompts = await asyncio.to_thread(self.prompts, request)  # tokenizing stays off the event loop
        params = [
            self.sampling_params(
                request,
                len(p["prompt_token_ids"]),
                request.max_tokens,
                logprobs=request.logprobs,
                prompt_logprobs=request.logprobs if request.echo and request.logprobs is not None else None,
            )
            for p in prompts
        ]
        request_id = self.request_id(request, "cmpl")
        model = request.model or self.model_name
        ticket = self.admit(len(prompts))
        try:
            streams = await self.start_all(request_id, prompts, params)
        except BaseException:
            ticket.release()
            raise
        if request.stream:
            return StreamingBody(
                self._stream(request, request_id, model, prompts, streams, ticket), streams, ticket
            )
        try:
            return await self._collect(request, request_id, model, prompts, streams)
        finally:
            ticket.release()

    # ---- whole responses ---------------------------------------------------------------------------

    async def _collect(self, request, request_id, model, prompts, streams) -> dict:
        n = request.n
        choices = [_Choice() for _ in range(len(prompts) * n)]
        prompt_logprobs: list = [None] * len(prompts)
        async with aclosing(merge(streams)) as merged:
            async for i, update in merged:
                if update.prompt_logprobs is not None:
                    prompt_logprobs[i] = update.prompt_logprobs
                for delta in update.completions:
                    self._add(choices[i * n + delta.index], delta, request.logprobs is not None)
        out = []
        for i, prompt in enumerate(prompts):
            prefix, prefix_logprobs = self._echo(request, prompt, prompt_logprobs[i])
            for j in range(n):
                c = choices[i * n + j]
                logprobs = None
                if request.logprobs is not None:
                    logprobs = c.logprobs
                    if prefix_logprobs is not None:
                        logprobs = _join(prefix_logprobs, logprobs)
                out.append(
                    CompletionChoice(
                        index=i * n + j,
                        text=prefix + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        num_prompt = sum(len(p["prompt_token_ids"]) for p in prompts)
        num_completion = sum(len(c.token_ids) for c in choices)
        usage = UsageInfo(
            prompt_tokens=num_prompt,
            completion_tokens=num_completion,
            total_tokens=num_prompt + num_completion,
        )
        return CompletionResponse(id=request_id, model=model, choices=out, usage=usage).model_dump(
            exclude_none=False
        )

    def _add(self, choice: _Choice, delta: CompletionDelta, want_logprobs: bool) -> None:
        if want_logprobs and delta.logprobs is not None:
            self._add_logprobs(choice.logprobs, delta, len(choice.text))
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason

    def _add_logprobs(self, out: CompletionLogprobs, delta: CompletionDelta, offset: int) -> None:
        for token, entries in zip(delta.token_ids, delta.logprobs):
            self._position(out, token, entries, offset)
            offset += len(out.tokens[-1])

    def _position(
        self, out: CompletionLogprobs, token: int, entries: dict[int, Logprob] | None, offset: int
    ) -> None:
        if entries is None:  # the first prompt token has none
            out.tokens.append(self.tokenizer.decode([token]))
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = entries.get(token)
            out.tokens.append(token_text(self.tokenizer, token, chosen))
            out.token_logprobs.append(chosen.logprob if chosen is not None else None)
            out.top_logprobs.append(
                {token_text(self.tokenizer, t, lp): lp.logprob for t, lp in entries.items()}
            )
        out.text_offset.append(offset)

    def _echo(self, request, prompt: dict, prompt_logprobs) -> tuple[str, CompletionLogprobs | None]:
        """With `echo`: the prompt's text (and log-probabilities) that come before each completion."""
        if not request.echo:
            return "", None
        ids = prompt["prompt_token_ids"]
        text = prompt.get("prompt")
        if text is None:
            text = self.tokenizer.decode(ids)
        if request.logprobs is None or prompt_logprobs is None:
            return text, None
        out = CompletionLogprobs()
        offset = 0
        for token, entries in zip(ids, prompt_logprobs):
            self._position(out, token, entries, offset)
            offset += len(out.tokens[-1])
        return text, out

    # ---- streams -------------------------------------------------------------------------------

    async def _stream(self, request, request_id, model, prompts, streams, ticket) -> AsyncIterator[str]:
        n = request.n
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        sse = SSEChunks(request_id, "text_completion", now(), model)
        echoed = [False] * (len(prompts) * n)
        offsets = [0] * (len(prompts) * n)
        num_prompt = sum(len(p["prompt_token_ids"]) for p in prompts)
        num_completion = 0
        merged = merge(streams)
        try:
            async for i, update in merged:
                choices = []
                for delta in update.completions:
                    index = i * n + delta.index
                    text = delta.text
                    logprobs = None
                    if request.logprobs is not None and delta.logprobs is not None:
                        logprobs = CompletionLogprobs()
                        self._add_logprobs(logprobs, delta, offsets[index])
                    if request.echo and not echoed[index]:
                        # As vLLM: the prompt (and its log-probabilities) opens each completion's first chunk.
                        prefix, prefix_logprobs = self._echo(request, prompts[i], update.prompt_logprobs)
                        text = prefix + text
                        if logprobs is not None and prefix_logprobs is not None:
                            logprobs = _join(prefix_logprobs, logprobs)
                        echoed[index] = True
                    offsets[index] += len(delta.text)
                    num_completion += len(delta.token_ids)
                    if not text and not delta.token_ids and delta.finish_reason is None:
                        continue
                    lp = None if logprobs is None else logprobs.model_dump()
                    choices.append(stream_choice(index, text, lp, delta.finish_reason, delta.stop_reason))
                if choices:
                    yield sse.line(
                        choices, _usage(num_prompt, num_completion) if include_usage and continuous else None
                    )
            if include_usage:
                yield sse.line([], _usage(num_prompt, num_completion))
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            ticket.release()


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }


def _join(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    shift = (first.text_offset[-1] + len(first.tokens[-1])) if first.tokens else 0
    return CompletionLogprobs(
        text_offset=first.text_offset + [o + shift for o in second.text_offset],
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
