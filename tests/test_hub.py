"""Hub repo ids resolved through huggingface_hub.snapshot_download from a fake cache with the real layout.

Every test runs offline (HF_HUB_OFFLINE set, in the environment and in huggingface_hub's constants), and
the one online-mode test replaces snapshot_download by a fake: nothing here reaches the network."""

import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import constants

from nanovllm.config import Config
from nanovllm.utils.hub import MODEL_FILE_PATTERNS, looks_like_repo_id, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache, repo_id: str, src: str, names=None) -> str:
    """`cache/models--org--name/{refs/main, snapshots/<COMMIT>/...}` holding files of `src`; returns the
    snapshot directory."""
    repo = os.path.join(str(cache), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name in names if names is not None else os.listdir(src):
        shutil.copy(os.path.join(src, name), os.path.join(snapshot, name))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline: huggingface_hub reads these constants at import time,
    so both the environment (for subprocesses) and the constants are set."""
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    return path


@pytest.fixture
def calls(monkeypatch):
    """The snapshot_download calls made (the real function still runs)."""
    seen: list[tuple[str, dict]] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        seen.append((repo_id, kwargs))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return seen


@pytest.mark.parametrize(
    "name, ok",
    [
        ("Qwen/Qwen3-0.6B", True),
        ("gpt2", True),
        ("org/name.v1_2", True),
        ("a/b/c", False),
        ("/abs/dir", False),
        ("./rel", False),
        ("../up", False),
        ("~/models/x", False),
        ("org\\name", False),
        ("", False),
    ],
)
def test_looks_like_repo_id(name, ok):
    assert looks_like_repo_id(name) is ok


def test_repo_id_resolves_to_the_cached_snapshot(cache, calls, qwen3_tied):
    snapshot = fake_cache(cache, "org/name", qwen3_tied)
    config = Config("org/name")
    assert config.model == snapshot and config.tokenizer == snapshot
    assert config.hf_config.vocab_size == 512
    (repo_id, kwargs), *more = calls
    assert repo_id == "org/name" and kwargs["local_files_only"] is True and not more


def test_tokenizer_repo_id_resolves_too(cache, calls, qwen3_tied):
    tok_names = [n for n in os.listdir(qwen3_tied) if n.startswith(("tokenizer", "chat_template"))]
    snapshot = fake_cache(cache, "org/tok", qwen3_tied, tok_names)
    config = Config(qwen3_tied, tokenizer="org/tok")
    assert config.tokenizer == snapshot and config.model == qwen3_tied
    assert [c[0] for c in calls] == ["org/tok"]


def test_missing_repo_id_names_id_offline_mode_and_cache(cache, calls):
    with pytest.raises(ValueError) as info:
        Config("org/missing")
    msg = str(info.value)
    assert "'org/missing'" in msg and "offline mode is on" in msg and repr(str(cache)) in msg
    assert calls and calls[0][0] == "org/missing"


def test_cached_repo_still_needs_weights(cache, qwen3_tied):
    fake_cache(cache, "org/noweights", qwen3_tied, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        Config("org/noweights")
    Config("org/noweights", load_format="dummy")


def test_paths_never_reach_the_hub(cache, calls, tmp_path):
    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(ValueError, match="does not exist"):
            Config(name)
    assert calls == []


def test_online_mode_downloads_only_the_needed_files(cache, monkeypatch, qwen3_tied):
    # Not offline: snapshot_download is asked for config, weights and tokenizer files only. It is a fake
    # here, so nothing is downloaded.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return qwen3_tied

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_path("org/name") == qwen3_tied
    assert seen["repo_id"] == "org/name" and seen["local_files_only"] is False
    assert seen["allow_patterns"] == list(MODEL_FILE_PATTERNS)
    from fnmatch import fnmatch

    wanted = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "tokenizer.model", "qwen.tiktoken"]  # fmt: skip
    unwanted = ["pytorch_model.bin", "model.pt", "modeling_custom.py", "flax_model.msgpack"]
    assert all(any(fnmatch(n, p) for p in seen["allow_patterns"]) for n in wanted)
    assert not any(fnmatch(n, p) for n in unwanted for p in seen["allow_patterns"])


def test_online_failure_says_offline_mode_was_off(cache, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fake(repo_id, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ValueError, match="'org/name'.*offline mode is off.*cannot reach the Hub"):
        resolve_model_path("org/name")


def test_hf_home_in_a_fresh_interpreter(tmp_path, qwen3_tied):
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported: set them before it is.
    home = tmp_path / "hf_home"
    snapshot = fake_cache(home / "hub", "org/name", qwen3_tied)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = "from nanovllm.config import Config; print(Config('org/name').model)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == snapshot
