"""Load a checkpoint's tokenizer, refusing a directory that has none.

Without tokenizer files, `AutoTokenizer.from_pretrained` does not fail: it builds a tokenizer whose only
entry is a special token, every prompt encodes to no ids and every output decodes to ''. We look for the
files first and check the vocabulary after loading."""

import os
from fnmatch import fnmatch

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Any one of these is a tokenizer: the fast tokenizers' tokenizer.json, SentencePiece models, WordPiece
# vocabularies, tiktoken ranks. A BPE vocab.json counts only with its merges.txt (checked below).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json + merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "*.tiktoken",
)


def find_tokenizer_files(path: str) -> list[str]:
    """The tokenizer files (of TOKENIZER_FILES) present in directory `path`, sorted."""
    names = set(os.listdir(path))
    found = []
    for pattern in TOKENIZER_FILES:
        if " + " in pattern:
            parts = pattern.split(" + ")
            if all(p in names for p in parts):
                found.extend(parts)
        else:
            found.extend(n for n in names if fnmatch(n, pattern))
    return sorted(set(found))


def check_tokenizer_files(path: str) -> None:
    """Raise ValueError naming `path` and the files looked for when it holds no tokenizer."""
    if not find_tokenizer_files(path):
        raise ValueError(
            f"tokenizer directory {path!r} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "pass tokenizer=<directory or hub repo id> to load the tokenizer from elsewhere"
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer in local directory `path` (a fast one where transformers has it). Code shipped with
    the checkpoint is never run. Raises ValueError for a directory without tokenizer files or a
    tokenizer whose vocabulary holds nothing but added (special) tokens."""
    check_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)
    # Added tokens (<|endoftext|>, ...) are in get_vocab() too; a usable tokenizer has more than those.
    if len(tokenizer.get_vocab()) <= len(tokenizer.get_added_vocab()):
        raise ValueError(
            f"the tokenizer loaded from {path!r} has an empty vocabulary "
            f"(only {len(tokenizer.get_added_vocab())} added token(s)); its tokenizer files "
            f"({', '.join(find_tokenizer_files(path))}) may be truncated or of an unsupported kind"
        )
    return tokenizer
