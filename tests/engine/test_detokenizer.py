"""The incremental detokenizer: joined deltas equal the full decode, no half character is released, and a
step decodes a short window rather than the whole completion."""

import random

import pytest

from nanovllm.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from nanovllm.utils.builtin_model import build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "héllo wörld: naïve café, 中文字符 and an emoji 😀 in the middle 🎉!",
    "  leading spaces,\ttabs\nand new lines\n\n  ",
]


class CountingTokenizer:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(400, str(path))
    return AutoTokenizer.from_pretrained(str(path))


def stream(detok: IncrementalDetokenizer, ids: list[int], sizes) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = next(sizes)
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    deltas.append(detok.add([], final=True))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_joins_to_the_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids, iter(lambda: 1, None))
    assert "".join(deltas) == text == detok.text
    # Multi-byte characters span several byte-level tokens: none is released half done.
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert all(d == "" or text.startswith("".join(deltas[: k + 1])) for k, d in enumerate(deltas))


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_and_chunks_join_to_the_full_decode(tok, seed):
    """Random ids (lone continuation bytes, special tokens) in random chunk sizes, with and without
    skip_special_tokens: the joined deltas are the full decode."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(50, 300))]
    for kwargs in ({}, {"skip_special_tokens": True}):
        detok = IncrementalDetokenizer(tok, **kwargs)
        deltas = stream(detok, ids, iter(lambda: rng.randint(1, 4), None))
        assert "".join(deltas) == tok.decode(ids, **kwargs) == detok.text
        # Released text never ends in a replacement character that more bytes could still complete...
        # unless the final decode released it.
        assert all(not d.endswith(REPLACEMENT_CHAR) for d in deltas[:-1] if d)


def test_a_step_decodes_a_window_not_the_whole_completion(tok):
    text = " ".join(TEXTS * 8)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 400
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    deltas = stream(detok, ids, iter(lambda: 1, None))
    assert "".join(deltas) == text
    steps, final = counting.lengths[:-1], counting.lengths[-1]
    assert final == len(ids)  # the one full decode, at the end
    # A window is the tokens released last time plus the new ones; it only grows while a character is
    # unfinished (an emoji is four byte tokens at most here).
    assert max(steps) <= 8, max(steps)
