"""Turn a `model=` or `tokenizer=` argument into a local directory: a directory is used as it is, a
Hugging Face Hub repo id (`org/name`) is looked up in the local hub cache and, unless offline mode is on,
downloaded into it. Nothing here imports or runs code from a repository."""

import os
import re

# What a model needs from its repository: config.json, generation_config.json, the safetensors shards
# and their index, and the tokenizer (tokenizer.json / tokenizer_config.json / special_tokens_map.json,
# vocab.json + merges.txt, vocab.txt, sentencepiece and tiktoken models). Pickle weights (*.bin, *.pt)
# and code (*.py) are never fetched.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
# A tokenizer-only repository needs the same minus the weights.
TOKENIZER_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken")

# `name` or `org/name`: letters, digits, '-', '_' and '.', starting with a letter, digit or '_'.
# huggingface_hub applies its own finer rules (no '--' or '..', at most 96 characters) when it is called.
_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.\-]*(/[A-Za-z0-9_][\w.\-]*)?")


def looks_like_repo_id(name: str) -> bool:
    """True for `name` and `org/name`; False for anything with more separators, a backslash, or a
    leading '/', '.' or '~' (those are paths)."""
    return _REPO_ID.fullmatch(name) is not None


def resolve_model_path(
    name: str, what: str = "model", allow_patterns: tuple[str, ...] = MODEL_FILE_PATTERNS
) -> str:
    """The local directory for `name` (the `what=` argument), without checking what it holds.

    A directory is returned as given (after `~` expansion). A path to a file is refused. A string that
    looks like a hub repo id is resolved by `huggingface_hub.snapshot_download` in the cache that
    huggingface_hub uses (HF_HOME / HF_HUB_CACHE): from the cache alone when HF_HUB_OFFLINE is set,
    otherwise downloading the files matching `allow_patterns` that are not cached yet.
    Raises ValueError naming `name` when none of this yields a directory.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(
            f"{what} path {path!r} is a file, not a model directory (pass the directory holding "
            "config.json and the *.safetensors files)"
        )
    if not looks_like_repo_id(name):
        raise ValueError(
            f"{what} directory {path!r} does not exist (a model is a local directory or a Hugging Face "
            "Hub repo id such as 'org/name')"
        )
    return _snapshot(name, what, allow_patterns)


def _snapshot(repo_id: str, what: str, allow_patterns: tuple[str, ...]) -> str:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    # Both are read on every call (not bound at import), as huggingface_hub itself reads them.
    offline = bool(constants.HF_HUB_OFFLINE)
    cache = constants.HF_HUB_CACHE
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=list(allow_patterns),
        )
    except (OSError, HFValidationError) as e:
        # OSError covers every hub failure: not cached (LocalEntryNotFoundError), offline
        # (OfflineModeIsEnabled), unknown, gated or private repo (HfHubHTTPError), disk errors.
        mode = (
            "offline mode is on (HF_HUB_OFFLINE), so only the cache was searched"
            if offline
            else "offline mode is off, and downloading it failed"
        )
        raise ValueError(
            f"{what} {repo_id!r} does not exist as a local directory, and as a Hugging Face Hub repo id it "
            f"could not be resolved: {mode}; cache directory searched: {cache!r} "
            f"({type(e).__name__}: {e})"
        ) from e
