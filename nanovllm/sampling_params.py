"""Per-request sampling settings (names and meanings follow vLLM's offline API)."""

import math
from dataclasses import dataclass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature: 0 samples greedily (argmax); > 0 divides the logits before the draw.
    max_tokens: the most completion tokens to generate (at least 1).
    ignore_eos: keep generating past the tokenizer's end-of-sequence token.
    top_p: keep the smallest set of most likely tokens whose probability adds up to at least top_p.
    top_k: keep the top_k most likely tokens (-1 or 0: all).
    min_p: drop tokens less likely than min_p times the most likely one.
    seed: per-request seed: the same seed gives the same tokens whatever else is in the batch.
    stop: a string or strings; generation ends at the first occurrence, which is cut from the text.
    stop_token_ids: token ids that end generation (the token stays in `token_ids`).
    logprobs: N: return the log-probability of each sampled token and of the N most likely tokens at
        that step (from the model's distribution before temperature and truncation).
    """

    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature):
            raise TypeError(
                f"SamplingParams.temperature must be a number, got {type(self.temperature).__name__}"
            )
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}"
            )
        self.temperature = float(self.temperature)
        if not _is_int(self.max_tokens):
            raise TypeError(f"SamplingParams.max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        self.top_p = float(self.top_p)
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or an int >= 1, got {self.top_k}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        self.min_p = float(self.min_p)
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be None or an int, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = list(self.stop)
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(
                    f"SamplingParams.stop must be a non-empty string or a list of them, got {self.stop!r}"
                )
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(
                    "SamplingParams.stop_token_ids must be a list of token ids >= 0, "
                    f"got {self.stop_token_ids!r}"
                )
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"SamplingParams.logprobs must be None or an int >= 0, got {self.logprobs!r}")

    @property
    def needs_truncation(self) -> bool:
        """Whether top-k, top-p or min-p change the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
