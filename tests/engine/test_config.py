"""Config's fields beyond the original (vLLM's names), model and tokenizer resolution, the tokenizer
check, and the distributed teardown helper. Nothing here reaches the hub: HF_HUB_OFFLINE is on."""

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from nanovllm.config import Config, make_config
from nanovllm.distributed import cleanup_dist_env_and_memory
from nanovllm.utils.tokenizer import TOKENIZER_FILES, load_tokenizer

WEIGHTS = "model.safetensors"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A string that looks like a repo id goes to huggingface_hub: let it read only the cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def model_dir(qwen3_tied, tmp_path) -> str:
    return str(shutil.copytree(qwen3_tied, tmp_path / "model"))


def only(src: str, dst, names) -> str:
    """A directory holding `names` copied from `src`."""
    os.makedirs(dst)
    for name in names:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def tokenizer_names(path: str) -> list[str]:
    return [n for n in os.listdir(path) if n in TOKENIZER_NAMES]


# ---- the new fields -----------------------------------------------------------------------------------


def test_new_fields_are_engine_arguments():
    names = Config.field_names()
    for name in ("tokenizer", "trust_remote_code", "load_format", "seed", "enable_prefix_caching"):
        assert name in names
    assert "eos_token_ids" not in names and "hf_config" not in names  # set after construction


def test_defaults(qwen3_tied):
    config = Config(qwen3_tied)
    assert config.seed is None and config.enable_prefix_caching is True
    assert config.trust_remote_code is False and config.load_format == "auto"
    assert config.tokenizer == config.model == qwen3_tied
    assert config.eos_token_ids == ()


def test_eos_token_ids_is_not_an_argument(qwen3_tied):
    with pytest.raises(TypeError, match="eos_token_ids"):
        Config(qwen3_tied, eos_token_ids=(1,))


@pytest.mark.parametrize("seed", [None, 0, 7, -3, 2**70])
def test_seed_accepts_ints_and_none(qwen3_tied, seed):
    assert Config(qwen3_tied, seed=seed).seed == seed


@pytest.mark.parametrize("seed", ["1", 1.0, True])
def test_seed_refuses_other_types(qwen3_tied, seed):
    with pytest.raises(TypeError, match="seed"):
        Config(qwen3_tied, seed=seed)


@pytest.mark.parametrize("value", [True, False])
def test_enable_prefix_caching(qwen3_tied, value):
    assert Config(qwen3_tied, enable_prefix_caching=value).enable_prefix_caching is value


@pytest.mark.parametrize("value", [1, "yes", None])
def test_enable_prefix_caching_must_be_a_bool(qwen3_tied, value):
    with pytest.raises(TypeError, match="enable_prefix_caching"):
        Config(qwen3_tied, enable_prefix_caching=value)


def test_trust_remote_code_true_is_refused(qwen3_tied):
    with pytest.raises(ValueError, match="trust_remote_code=True.*never runs code shipped with a checkpoint"):
        Config(qwen3_tied, trust_remote_code=True)


def test_trust_remote_code_must_be_a_bool(qwen3_tied):
    with pytest.raises(TypeError, match="trust_remote_code"):
        Config(qwen3_tied, trust_remote_code="no")


@pytest.mark.parametrize(
    "dtype, canonical, torch_dtype",
    [
        ("auto", "auto", torch.float32),  # on the CPU, "auto" is float32
        ("half", "float16", torch.float16),
        ("float16", "float16", torch.float16),
        ("float", "float32", torch.float32),
        ("float32", "float32", torch.float32),
        ("bfloat16", "bfloat16", torch.bfloat16),
        (torch.float16, "float16", torch.float16),
        (torch.bfloat16, "bfloat16", torch.bfloat16),
        (torch.float32, "float32", torch.float32),
    ],
)
def test_dtype_aliases(qwen3_tied, dtype, canonical, torch_dtype):
    config = Config(qwen3_tied, dtype=dtype)
    assert config.dtype == canonical
    assert config.resolve_dtype(torch.device("cpu")) == torch_dtype


@pytest.mark.parametrize("dtype", ["float8", "fp16", "torch.float16", torch.float64, torch.int8, 16])
def test_dtype_refused(qwen3_tied, dtype):
    with pytest.raises(ValueError, match="dtype"):
        Config(qwen3_tied, dtype=dtype)


@pytest.mark.parametrize("fmt", ["auto", "safetensors", "dummy"])
def test_load_formats(qwen3_tied, fmt):
    assert Config(qwen3_tied, load_format=fmt).load_format == fmt


@pytest.mark.parametrize("fmt", ["pt", "gguf", "DUMMY", None])
def test_unknown_load_format_lists_the_allowed_ones(qwen3_tied, fmt):
    with pytest.raises(ValueError, match=r"load_format must be one of \('auto', 'safetensors', 'dummy'\)"):
        Config(qwen3_tied, load_format=fmt)


def test_make_config_names_the_new_fields_for_an_unknown_keyword(qwen3_tied):
    with pytest.raises(TypeError, match="unknown engine argument.*load_format"):
        make_config(qwen3_tied, dict(load_fmt="dummy"))


# ---- model path -------------------------------------------------------------------------------------


def test_a_file_as_model_is_named_a_file(qwen3_tied):
    path = os.path.join(qwen3_tied, "config.json")
    with pytest.raises(ValueError, match="is a file, not a model directory") as info:
        Config(path)
    assert repr(path) in str(info.value)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "a/b/c", "~/no-such-model-dir"])
def test_a_missing_path_does_not_exist(name):
    with pytest.raises(ValueError, match="does not exist"):
        Config(name)


def test_dummy_load_format_needs_no_weight_file(qwen3_tied, tmp_path):
    path = only(qwen3_tied, tmp_path / "m", ["config.json", *tokenizer_names(qwen3_tied)])
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        Config(path)
    config = Config(path, load_format="dummy")
    assert config.model == path and config.hf_config.vocab_size == 512


def test_dummy_load_format_still_needs_config_json(qwen3_tied, tmp_path):
    path = only(qwen3_tied, tmp_path / "m", tokenizer_names(qwen3_tied))
    with pytest.raises(ValueError, match="config.json"):
        Config(path, load_format="dummy")


# ---- tokenizer ----------------------------------------------------------------------------------------


def test_model_without_tokenizer_files_is_refused(model_dir):
    for name in tokenizer_names(model_dir):
        os.remove(os.path.join(model_dir, name))
    with pytest.raises(ValueError, match="has no tokenizer files") as info:
        Config(model_dir)
    msg = str(info.value)
    assert repr(model_dir) in msg and "tokenizer=" in msg
    for name in TOKENIZER_FILES:
        assert name in msg
    # load_tokenizer refuses it the same way (transformers alone would build an empty tokenizer).
    with pytest.raises(ValueError, match="has no tokenizer files"):
        load_tokenizer(model_dir)


def test_tokenizer_from_another_directory(qwen3_tied, model_dir, tmp_path):
    for name in tokenizer_names(model_dir):
        os.remove(os.path.join(model_dir, name))
    tok_dir = only(qwen3_tied, tmp_path / "tok", tokenizer_names(qwen3_tied))
    config = Config(model_dir, tokenizer=tok_dir)
    assert config.tokenizer == tok_dir and config.model == model_dir
    tokenizer = load_tokenizer(config.tokenizer)
    ids = tokenizer.encode("Hello, my name is")
    assert ids and tokenizer.decode(ids) == "Hello, my name is"


def test_tokenizer_path_must_exist(qwen3_tied, tmp_path):
    with pytest.raises(ValueError, match="tokenizer directory .* does not exist"):
        Config(qwen3_tied, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="tokenizer"):
        Config(qwen3_tied, tokenizer=5)


def test_tokenizer_with_an_empty_vocabulary_is_refused(tmp_path):
    # A tokenizer.json whose model has no entries: transformers loads it, with only the special token.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={}, unk_token=None))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="empty vocabulary"):
        load_tokenizer(str(tmp_path))


def test_a_bpe_vocab_needs_its_merges(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


# ---- teardown -----------------------------------------------------------------------------------------


def test_cleanup_dist_env_and_memory_is_idempotent_on_cpu(tmp_path):
    cleanup_dist_env_and_memory()
    cleanup_dist_env_and_memory(shutdown_ray=True)  # no Ray installed or running: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    cleanup_dist_env_and_memory()
    assert not dist.is_initialized()
    cleanup_dist_env_and_memory()
