"""Incremental detokenization for streaming and stop strings."""

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing list of completion tokens, released only once it is stable.

    Each step decodes a short window, not the whole completion: the tokens released last time (context,
    so that a token's leading space or merged bytes come out as they do in the full text) plus the new
    ones, and releases what the new ones add to the context's text. A multi-byte character split over
    several tokens decodes to U+FFFD until its last byte arrives, so trailing replacement characters are
    held back (the window then keeps its start until its text ends in a whole character). `final`
    decodes the whole completion once and releases the rest of it, so `text` (the released text; joined
    deltas equal it) ends as the full decode whenever the windows agreed with it. A step's cost no
    longer grows with the completion's length.
    """

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs  # e.g. skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # the window starts here: tokens released last time, decoded for context
        self.read_offset = 0  # the window's new tokens start here
        self.held = 0  # characters of the new tokens' text released already (the window ended in U+FFFD)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self.decode_kwargs)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the newly released text (everything, when `final`)."""
        self.token_ids.extend(token_ids)
        if final:
            full = self._decode(self.token_ids)
            if not full.startswith(self.text):
                # The windows' text and the full decode disagree (rare tokenizer clean-ups): released text
                # is never taken back, so the full text's part past it comes last.
                full = self.text + full[len(self.text) :]
            delta = full[len(self.text) :]
            self.text = full
            self.prefix_offset = self.read_offset = len(self.token_ids)
            self.held = 0
            return delta
        if len(self.token_ids) == self.read_offset:
            return ""
        context = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset :])
        if not window.startswith(context):
            return ""  # the new tokens rewrote their context's text: wait for more (or the final decode)
        new = window[len(context) :]
        whole = not new.endswith(REPLACEMENT_CHAR)
        stable = new if whole else new.rstrip(REPLACEMENT_CHAR)
        delta = stable[self.held :]
        self.text += delta
        if whole:  # the next window starts at these tokens
            self.prefix_offset, self.read_offset, self.held = self.read_offset, len(self.token_ids), 0
        else:
            self.held += len(delta)
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
