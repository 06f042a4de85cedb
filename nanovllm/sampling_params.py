"""Per-request sampling settings (names and meanings follow vLLM's offline API).

Each field has one validator (`_CHECKS[name]`) that checks a value and returns it normalised (a single
stop string becomes a list, ints become floats, numpy token ids become ints, containers are copied).
`__post_init__` runs every validator and then the checks that involve several fields; once the object
is built, assigning a field runs that field's validator and the cross-field checks again, and a value
that fails leaves the old one in place.
"""

import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# vLLM clamps every logit_bias value into [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]: a bias of 100 already
# makes a token certain (or impossible) against any realistic logit, and the clamp keeps sums finite.
LOGIT_BIAS_LIMIT = 100.0
# Presence and frequency penalties live in [-PENALTY_LIMIT, PENALTY_LIMIT] (OpenAI's range, as in vLLM).
PENALTY_LIMIT = 2.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    """A Python or numpy integer >= 0 (bool refused: True is not a token id)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _as_list(name: str, value, what: str = "a list") -> list:
    """A copy of `value` as a list; a string or a non-iterable is a ValueError naming the field."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"SamplingParams.{name} must be {what}, got the string {value!r}")
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"SamplingParams.{name} must be {what}, got {value!r}") from None


def _token_id_list(name: str, value) -> list[int] | None:
    if value is None:
        return None
    ids = _as_list(name, value, "a list of token ids")
    if not all(_is_token_id(t) for t in ids):
        raise ValueError(f"SamplingParams.{name} must be a list of token ids >= 0, got {value!r}")
    return [operator.index(t) for t in ids]


def _check_temperature(value) -> float:
    if not _is_number(value):
        raise TypeError(f"SamplingParams.temperature must be a number, got {type(value).__name__}")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {value}")
    return float(value)


def _check_max_tokens(value) -> int:
    if not _is_int(value):
        raise TypeError(f"SamplingParams.max_tokens must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {value}")
    return value


def _check_ignore_eos(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {type(value).__name__}")
    return value


def _check_top_p(value) -> float:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {value}")
    return float(value)


def _check_top_k(value) -> int:
    if not _is_int(value) or not (value in (-1, 0) or value >= 1):
        raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or an int >= 1, got {value}")
    return value


def _check_min_p(value) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {value}")
    return float(value)


def _check_seed(value) -> int | None:
    if value is not None and not _is_int(value):
        raise ValueError(f"SamplingParams.seed must be None or an int, got {value!r}")
    return value


def _check_stop(value) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else _as_list("stop", value, "a string or a list of strings")
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"SamplingParams.stop must be a non-empty string or a list of them, got {value!r}")
    return stops


def _check_stop_token_ids(value) -> list[int] | None:
    return _token_id_list("stop_token_ids", value)


def _check_n(value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"SamplingParams.n must be an int >= 1, got {value!r}")
    return value


def _penalty_check(name: str) -> Callable[[object], float]:
    def check(value) -> float:
        if not _is_number(value) or not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
            limit = PENALTY_LIMIT
            raise ValueError(f"SamplingParams.{name} must be a number in [{-limit}, {limit}], got {value!r}")
        return float(value)

    return check


def _check_repetition_penalty(value) -> float:
    if not _is_number(value) or not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"SamplingParams.repetition_penalty must be a finite number > 0, got {value!r}")
    return float(value)


def _check_min_tokens(value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"SamplingParams.min_tokens must be an int >= 0, got {value!r}")
    return value


def _check_logit_bias(value) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"SamplingParams.logit_bias must be None or a dict of token id -> bias, got {value!r}"
        )
    bias = {}
    for token, b in value.items():
        if not _is_token_id(token):
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids >= 0, got {token!r}")
        if not _is_number(b) or not math.isfinite(b):
            raise ValueError(
                f"SamplingParams.logit_bias values must be finite numbers, got {b!r} for {token}"
            )
        bias[operator.index(token)] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(b)))
    return bias


def _check_allowed_token_ids(value) -> list[int] | None:
    ids = _token_id_list("allowed_token_ids", value)
    if ids is not None and not ids:
        raise ValueError("SamplingParams.allowed_token_ids must be None or a non-empty list of token ids")
    return ids


def _check_bad_words(value) -> list[str] | None:
    if value is None:
        return None
    words = _as_list("bad_words", value, "a list of strings")
    if not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"SamplingParams.bad_words must be a list of non-empty strings, got {value!r}")
    return list(dict.fromkeys(words))  # duplicates dropped, order kept (as vLLM does)


def _bool_check(name: str) -> Callable[[object], bool]:
    def check(value) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"SamplingParams.{name} must be a bool, got {value!r}")
        return value

    return check


def _count_check(name: str) -> Callable[[object], int | None]:
    def check(value) -> int | None:
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"SamplingParams.{name} must be None or an int >= 0, got {value!r}")
        return value

    return check


# One validator per field: it checks a value and returns it normalised.
@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on a completion's text, as vLLM's (exactly one of the first five):

    json: a JSON schema (a dict or its JSON text): the completion is a JSON value it validates.
    regex: the completion fully matches this regular expression.
    choice: the completion is one of these strings.
    grammar: an EBNF (GBNF) grammar whose `root` rule the completion matches.
    json_object: True: any JSON object.
    disable_any_whitespace: JSON without free whitespace between tokens (keeps weak models from
        looping on spaces).
    Grammars are compiled by xgrammar (`pip install nano-vllm[structured]`).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) if given else 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(
                f"StructuredOutputsParams.json must be a schema dict or JSON text, got {self.json!r}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            choice = list(self.choice) if not isinstance(self.choice, str) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(
                    f"StructuredOutputsParams.choice must be a list of non-empty strings, got {self.choice!r}"
                )
            self.choice = choice
        if self.json_object not in (None, True, False):
            raise ValueError(f"StructuredOutputsParams.json_object must be a bool, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(
                "StructuredOutputsParams.disable_any_whitespace must be a bool, "
                f"got {self.disable_any_whitespace!r}"
            )

    def key(self) -> tuple:
        """What identifies the compiled grammar (requests with equal keys share it)."""
        import json as json_module

        spec = self.json if not isinstance(self.json, dict) else json_module.dumps(self.json, sort_keys=True)
        kind = next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))
        value = {"json": spec, "choice": tuple(self.choice or ())}.get(kind, getattr(self, kind))
        return kind, value, self.disable_any_whitespace


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _check_structured_outputs(value) -> StructuredOutputsParams | None:
    if value is not None and not isinstance(value, StructuredOutputsParams):
        raise ValueError(
            "SamplingParams.structured_outputs must be a StructuredOutputsParams or None, "
            f"got {type(value).__name__}"
        )
    return value


_CHECKS: dict[str, Callable[[object], object]] = {
    "temperature": _check_temperature,
    "max_tokens": _check_max_tokens,
    "ignore_eos": _check_ignore_eos,
    "top_p": _check_top_p,
    "top_k": _check_top_k,
    "min_p": _check_min_p,
    "seed": _check_seed,
    "stop": _check_stop,
    "stop_token_ids": _check_stop_token_ids,
    "logprobs": _count_check("logprobs"),
    "n": _check_n,
    "presence_penalty": _penalty_check("presence_penalty"),
    "frequency_penalty": _penalty_check("frequency_penalty"),
    "repetition_penalty": _check_repetition_penalty,
    "min_tokens": _check_min_tokens,
    "logit_bias": _check_logit_bias,
    "allowed_token_ids": _check_allowed_token_ids,
    "bad_words": _check_bad_words,
    "skip_special_tokens": _bool_check("skip_special_tokens"),
    "spaces_between_special_tokens": _bool_check("spaces_between_special_tokens"),
    "include_stop_str_in_output": _bool_check("include_stop_str_in_output"),
    "prompt_logprobs": _count_check("prompt_logprobs"),
    "detokenize": _bool_check("detokenize"),
    "structured_outputs": _check_structured_outputs,
}


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
    n: how many completions to generate for the prompt (>= 1; greedy ones are identical).
    presence_penalty: in [-2, 2]; subtracted from the logit of every token already in the completion.
    frequency_penalty: in [-2, 2]; times a token's count in the completion, subtracted from its logit.
    repetition_penalty: > 0; tokens in the prompt or completion get logit / p if positive, else logit * p.
    min_tokens: no EOS or stop_token_ids token can be sampled before this many completion tokens.
    logit_bias: token id -> value added to its logit before sampling (clamped to [-100, 100]).
    allowed_token_ids: only these tokens can be sampled (non-empty).
    bad_words: words that cannot be generated: a word's last token is banned when it would complete it.
    skip_special_tokens: leave special tokens out of the output text.
    spaces_between_special_tokens: put spaces between special tokens in the output text.
    include_stop_str_in_output: keep the matched stop string at the end of the output text.
    prompt_logprobs: N: return the log-probabilities of each prompt token and of the N most likely.
    detokenize: produce output text (False: token ids only; `stop` strings then cannot be used).
    structured_outputs: a `StructuredOutputsParams` constraint (JSON schema, regex, choice, grammar).

    A wrong type for temperature, max_tokens or ignore_eos is a TypeError; every other invalid value is
    a ValueError naming the field. Assigning a field after construction validates it again (changing a
    list or dict in place does not: assign a new one).
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
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # False while __init__ assigns the raw values; __post_init__ sets it once all of them are validated.
    _validated: bool = field(default=False, init=False, repr=False, compare=False)
    # `needs_logits_processing`, kept current on every assignment: the model runner reads it for every
    # row of every step, and a stored bool costs a fifth of evaluating the rule there.
    _needs_processing: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))
        self._check_together()
        object.__setattr__(self, "_needs_processing", self._processing_rule())
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value) -> None:
        check = _CHECKS.get(name)
        if check is None or not getattr(self, "_validated", False):
            object.__setattr__(self, name, value)
            return
        new = check(value)  # raises before anything changes
        old = getattr(self, name)
        object.__setattr__(self, name, new)
        try:
            self._check_together()
        except ValueError:
            object.__setattr__(self, name, old)
            raise
        object.__setattr__(self, "_needs_processing", self._processing_rule())

    def _check_together(self) -> None:
        """The rules that involve more than one field."""
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens must be <= SamplingParams.max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}"
            )
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop strings need SamplingParams.detokenize=True")

    def clone(self) -> "SamplingParams":
        """An independent copy (its lists and dict are new objects). The engine copies every request's
        parameters, so this skips re-validating what is already valid."""
        copy = SamplingParams.__new__(SamplingParams)
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, (list, dict)):
                value = value.copy()
            object.__setattr__(copy, name, value)
        return copy

    @property
    def needs_truncation(self) -> bool:
        """Whether top-k, top-p or min-p change the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def needs_penalties(self) -> bool:
        """Whether a presence, frequency or repetition penalty changes the logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_logits_processing(self) -> bool:
        """Whether something besides the sampler changes this request's logits (a penalty, min_tokens,
        logit_bias, allowed_token_ids or bad_words: `nanovllm.layers.logits_processor`)."""
        return self._needs_processing

    def _processing_rule(self) -> bool:
        return (
            self.needs_penalties
            or self.min_tokens > 0
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or bool(self.bad_words)
        )


def params_per_prompt(sampling_params, default: "SamplingParams", num_prompts: int) -> list["SamplingParams"]:
    """`generate`'s sampling_params spread over its prompts: None means `default` for each, one object
    serves them all, a sequence gives one per prompt (its length must match)."""
    if sampling_params is None:
        return [default] * num_prompts
    if isinstance(sampling_params, Sequence):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts")
        return list(sampling_params)
    return [sampling_params] * num_prompts
