"""Prompt forms `generate` accepts, as vLLM's `vllm.inputs`: a string, token ids, or a dict of either.

`generate(prompts)` takes one prompt or a list of them, in any mix of:
- a string (tokenized with the model's tokenizer);
- a list of token ids (ints, numpy integers included) — a flat list of ints is one prompt;
- `TextPrompt`: `{"prompt": "..."}`; `TokensPrompt`: `{"prompt_token_ids": [...]}`.
"""

import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[None]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = str | list[int] | TextPrompt | TokensPrompt


@dataclass(slots=True)
class ParsedPrompt:
    """A prompt reduced to its text (None when given as ids) and its token ids (None until tokenized)."""

    text: str | None
    token_ids: list[int] | None


def _token_id(value, where: str) -> int:
    """`value` as a token id: ints and numpy integers, never bools, floats or bytes."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: token ids must be ints, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: token ids must be ints, got {type(value).__name__} {value!r}") from None


def _token_ids(values, where: str) -> list[int]:
    if isinstance(values, (str, bytes, bytearray)) or not isinstance(values, Sequence):
        if not hasattr(values, "tolist"):  # numpy arrays and tensors are not Sequences
            raise TypeError(f"{where}: token ids must be a list of ints, got {type(values).__name__}")
        values = values.tolist()
    if set(map(type, values)) <= {int}:  # the common case, checked at C speed
        return list(values)
    return [_token_id(v, where) for v in values]


def _check_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: the text has a character that is not valid Unicode text ({text[e.start]!r} at "
            f"position {e.start}, a lone surrogate)"
        ) from None
    return text


def parse_prompt(prompt, where: str = "prompt") -> ParsedPrompt:
    """One prompt in any accepted form; TypeError/ValueError naming the problem otherwise."""
    if isinstance(prompt, str):
        return ParsedPrompt(_check_text(prompt, where), None)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{where}: 'prompt' must be a string, got {type(text).__name__}")
            return ParsedPrompt(text, _token_ids(prompt["prompt_token_ids"], f"{where}['prompt_token_ids']"))
        if "prompt" in prompt:
            text = prompt["prompt"]
            if not isinstance(text, str):
                raise TypeError(f"{where}['prompt'] must be a string, got {type(text).__name__}")
            return ParsedPrompt(_check_text(text, where), None)
        raise TypeError(
            f"{where}: a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}"
        )
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"{where}: got bytes {prompt!r}; pass text as str or token ids as a list of ints")
    return ParsedPrompt(None, _token_ids(prompt, where))


def _is_single_token_prompt(prompts) -> bool:
    """A flat list of ints (or a 1-D array) is one token prompt, as in vLLM."""
    if hasattr(prompts, "ndim"):
        return prompts.ndim == 1
    return bool(prompts) and all(isinstance(p, numbers.Integral) for p in prompts)


def parse_prompts(prompts) -> list[ParsedPrompt]:
    """`generate`'s `prompts` argument as a list: a single prompt becomes a list of one."""
    if isinstance(prompts, (str, dict)):
        return [parse_prompt(prompts)]
    if isinstance(prompts, (bytes, bytearray)) or not (
        isinstance(prompts, Sequence) or hasattr(prompts, "ndim")
    ):
        raise TypeError(
            "prompts must be a string, a list of token ids, a prompt dict, or a list of these; "
            f"got {type(prompts).__name__}"
        )
    if _is_single_token_prompt(prompts):
        return [parse_prompt(prompts)]
    return [parse_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def prompt_token_ids(prompt: ParsedPrompt, tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    """The token ids a model is fed for `prompt` (its own ids, or its text tokenized by `tokenizer`),
    checked against the model: at least one token, every id in [0, vocab_size), at most max_model_len
    of them; ValueError naming the problem otherwise. Shared by the engine and the data-parallel driver,
    which checks prompts before any replica sees them."""
    token_ids = prompt.token_ids if prompt.token_ids is not None else tokenizer.encode(prompt.text)
    if not token_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(token_ids) > max_model_len:
        raise ValueError(f"the prompt has {len(token_ids)} tokens, more than max_model_len={max_model_len}")
    return token_ids
