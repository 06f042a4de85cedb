"""POST /v1/chat/completions: the messages rendered by the chat template (as `LLM.chat`), `n` answers,
whole or streamed; `response_format` json_object/json_schema become structured outputs."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from nanovllm.engine.async_llm import CompletionDelta
from nanovllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    ChatTokenLogprob,
    TopLogprob,
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
    top_by_rank,
)

# OpenAI's limit on top_logprobs for chat.
MAX_TOP_LOGPROBS = 20


def message_text(message: ChatMessage, where: str) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(
                400,
                f"{where}.content[{j}]: only text parts are supported, got type {part.get('type')!r}",
                f"{where}.content",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def render_chat(tokenizer, request, messages: list[ChatMessage]) -> str:
    """The conversation through the chat template (the request's or the tokenizer's); 400 if it fails."""
    if not messages:
        raise OpenAIError(400, "messages must not be empty", "messages")
    conversation = []
    for i, m in enumerate(messages):
        entry = {"role": m.role, "content": message_text(m, f"messages[{i}]")}
        if m.name is not None:
            entry["name"] = m.name
        conversation.append(entry)
    template = getattr(request, "chat_template", None)
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise OpenAIError(400, "this model's tokenizer has no chat template; pass chat_template", "messages")
    if request.add_generation_prompt and request.continue_final_message:
        raise OpenAIError(
            400,
            "add_generation_prompt and continue_final_message cannot both be true",
            "continue_final_message",
        )
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            chat_template=template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=getattr(request, "tools", None),
            **(request.chat_template_kwargs or {}),
        )
    except Exception as e:  # the template's own error (jinja2 raises many kinds)
        raise OpenAIError(400, f"the chat template failed on these messages: {e}", "messages") from None


class _Answer:
    def __init__(self):
        self.text = ""
        self.num_tokens = 0
        self.logprobs: list[ChatTokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class OpenAIServingChat(OpenAIServing):
    def prompt(self, request: ChatCompletionRequest) -> dict:
        text = render_chat(self.tokenizer, request, request.messages)
        # The template holds any BOS already: no special tokens added (as vLLM and LLM.chat).
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise OpenAIError(400, "the rendered conversation is empty", "messages")
        return {"prompt": text, "prompt_token_ids": ids}

    async def create(self, request: ChatCompletionRequest):
        self.check_model(request.model)
        if request.tool_choice not in (None, "none"):
            raise OpenAIError(
                400, "tool calling is not supported (tool_choice must be 'none')", "tool_choice"
            )
        top = request.top_logprobs
        if top is not None:
            if not request.logprobs:
                raise OpenAIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise OpenAIError(
                    400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
                )
        prompt = await asyncio.to_thread(self.prompt, request)  # the template and tokenizer off the loop
        max_tokens = (
            request.max_completion_tokens
            if request.max_completion_tokens is not None
            else (request.max_tokens)
        )
        params = self.sampling_params(
            request,
            len(prompt["prompt_token_ids"]),
            max_tokens,
            logprobs=(top or 0) if request.logprobs else None,
            prompt_logprobs=None,
        )
        request_id = self.request_id(request, "chatcmpl")
        model = request.model or self.model_name
        ticket = self.admit(1)
        try:
            (stream,) = await self.start_all(request_id, [prompt], [params])
        except BaseException:
            ticket.release()
            raise
        if request.stream:
            return StreamingBody(
                self._stream(request, request_id, model, prompt, stream, ticket), [stream], ticket
            )
        try:
            return await self._collect(request, request_id, model, prompt, stream)
        finally:
            ticket.release()

    def _echo_text(self, request: ChatCompletionRequest) -> str:
        """vLLM's `echo`: the last message's content comes first when it is the assistant's."""
        last = request.messages[-1]
        if request.echo and last.role == "assistant":
            return message_text(last, f"messages[{len(request.messages) - 1}]")
        return ""

    def _logprobs(self, delta: CompletionDelta, top: int) -> list[ChatTokenLogprob]:
        out = []
        for token, entries in zip(delta.token_ids, delta.logprobs or []):
            chosen = entries[token]
            text = token_text(self.tokenizer, token, chosen)
            out.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=chosen.logprob,
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(
                            token=(t := token_text(self.tokenizer, tid, lp)),
                            logprob=lp.logprob,
                            bytes=list(t.encode("utf-8")),
                        )
                        for tid, lp in top_by_rank(entries, top)
                    ],
                )
            )
        return out

    async def _collect(self, request, request_id, model, prompt, stream) -> dict:
        answers = [_Answer() for _ in range(request.n)]
        top = request.top_logprobs or 0
        async with aclosing(merge([stream])) as merged:
            async for _, update in merged:
                for delta in update.completions:
                    a = answers[delta.index]
                    a.text += delta.text
                    a.num_tokens += len(delta.token_ids)
                    if request.logprobs:
                        a.logprobs += self._logprobs(delta, top)
                    if delta.finish_reason is not None:
                        a.finish_reason, a.stop_reason = delta.finish_reason, delta.stop_reason
        prefix = self._echo_text(request)
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=prefix + a.text),
                logprobs=ChatLogprobs(content=a.logprobs) if request.logprobs else None,
                finish_reason=a.finish_reason,
                stop_reason=a.stop_reason,
            )
            for i, a in enumerate(answers)
        ]
        num_prompt = len(prompt["prompt_token_ids"])
        num_completion = sum(a.num_tokens for a in answers)
        usage = UsageInfo(
            prompt_tokens=num_prompt,
            completion_tokens=num_completion,
            total_tokens=num_prompt + num_completion,
        )
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage).model_dump()

    async def _stream(self, request, request_id, model, prompt, stream, ticket) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        sse = SSEChunks(request_id, "chat.completion.chunk", now(), model)
        top = request.top_logprobs or 0
        num_prompt = len(prompt["prompt_token_ids"])
        num_completion = 0
        prefix = self._echo_text(request)

        def usage() -> dict:
            return {
                "prompt_tokens": num_prompt,
                "completion_tokens": num_completion,
                "total_tokens": num_prompt + num_completion,
            }

        merged = merge([stream])
        try:
            # As OpenAI: each answer opens with the role (and vLLM's echo) before any content.
            opening = [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": prefix},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(request.n)
            ]
            yield sse.line([json.dumps(c) for c in opening])
            async for _, update in merged:
                choices = []
                for delta in update.completions:
                    num_completion += len(delta.token_ids)
                    if not delta.text and not delta.token_ids and delta.finish_reason is None:
                        continue
                    lp = None
                    if request.logprobs:
                        lp = {"content": [x.model_dump() for x in self._logprobs(delta, top)]}
                    choices.append(
                        stream_choice(
                            delta.index, delta.text, lp, delta.finish_reason, delta.stop_reason, chat=True
                        )
                    )
                if choices:
                    yield sse.line(choices, usage() if include_usage and continuous else None)
            if include_usage:
                yield sse.line([], usage())
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            ticket.release()
