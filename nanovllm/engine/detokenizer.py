"""Incremental detokenization for streaming and stop strings."""

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing list of completion tokens, released only once it is stable.

    A multi-byte character split over several tokens decodes to U+FFFD until its last byte arrives, so
    trailing replacement characters are held back. `text` is the released text; joined deltas equal it.
    """

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs  # e.g. skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the newly released text (everything, when `final`)."""
        self.token_ids.extend(token_ids)
        full = self.tokenizer.decode(self.token_ids, **self.decode_kwargs)
        if not final:
            full = full.rstrip(REPLACEMENT_CHAR)
        if not full.startswith(self.text):
            # Decoding a longer list rewrote earlier text (rare tokenizer clean-ups): release it at the end.
            if not final:
                return ""
            full = self.text + full[len(self.text) :]
        delta = full[len(self.text) :]
        self.text = full
        return delta


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """(index in `text`, stop string) of the earliest stop string that ends at or after `start`, or
    None."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
