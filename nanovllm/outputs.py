"""What `generate`, `chat` and `step` return: vLLM's `RequestOutput` / `CompletionOutput` / `Logprob`.

A `RequestOutput` is one prompt's result with one `CompletionOutput` per sampled completion
(`SamplingParams.n` of them). Scripts written for the original nano-vllm index results like dicts
(`out["text"]`, `out["token_ids"]`): a `RequestOutput` answers those keys from its first completion.
"""

from dataclasses import dataclass, field

# The keys the original's dict results had (plus the two it gained here), read from the first completion.
_DICT_KEYS = ("text", "token_ids", "finish_reason", "logprobs", "stop_reason", "cumulative_logprob")


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token at one position, its rank there (1 = the most likely) and its
    text (None when the request asked for no detokenization)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: {token id: Logprob} for the sampled (or prompt) token and the N most likely ones.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt position; the first is None (nothing precedes the first token).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request.

    finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or max_model_len),
    "abort" (aborted), or None while unfinished. stop_reason: the stop string or stop token id that
    ended it; None for EOS, length or abort.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """One request's prompt and completions. `finished` once every completion is."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Not vLLM's: the prompt's position in the call that made it (generate/stream), else None.
    index: int | None = field(default=None, repr=False)

    def __getitem__(self, key: str):
        """The original nano-vllm's dict access: `out["text"]`, `out["token_ids"]`, ... of the first
        completion."""
        if key not in _DICT_KEYS:
            raise KeyError(
                f"{key!r}: a RequestOutput answers {', '.join(map(repr, _DICT_KEYS))} (its first "
                "completion's); read other fields as attributes (out.prompt, out.outputs[i].text)"
            )
        return getattr(self.outputs[0], key)

    def __contains__(self, key: str) -> bool:
        return key in _DICT_KEYS and (key != "logprobs" or self.outputs[0].logprobs is not None)

    def keys(self) -> list[str]:
        return [k for k in _DICT_KEYS if k in self]

    def get(self, key: str, default=None):
        return self[key] if key in self else default
