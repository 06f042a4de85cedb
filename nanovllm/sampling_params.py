"""Per-request sampling settings."""

from dataclasses import dataclass


@dataclass(slots=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature: 0 samples greedily (argmax); > 0 divides the logits before the softmax draw.
    max_tokens: the most completion tokens to generate (at least 1).
    ignore_eos: keep generating past the tokenizer's end-of-sequence token.
    """

    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(
                f"SamplingParams.temperature must be a number, got {type(self.temperature).__name__}"
            )
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise ValueError(
                f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}"
            )
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise TypeError(f"SamplingParams.max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        self.temperature = float(self.temperature)
