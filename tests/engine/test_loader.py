"""Weight loading through the public API: every malformed checkpoint is refused with a ValueError that
names the tensor at fault, pickle files are never unpickled and no code from the model directory runs."""

import builtins
import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.models.registry import get_model_class, resolve_architecture
from nanovllm.utils.loader import load_dummy_weights, load_model, load_weights
from tests.conftest import random_prompts, write_hf_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
SMALL = dict(kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=64)
WEIGHTS = "model.safetensors"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
LAYER0 = "model.layers.0."


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, WEIGHTS))


def write_weights(path: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Replace every *.safetensors file of `path` by `files` (file name -> tensors)."""
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(path, name))
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, name))


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def greedy_tokens(path: str) -> list[list[int]]:
    with LLM(path, **SMALL) as llm:
        return [o["token_ids"] for o in llm.generate(random_prompts(2, [5, 20]), GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_tokens(qwen3_tied) -> list[list[int]]:
    return greedy_tokens(qwen3_tied)


@pytest.fixture
def model_dir(qwen3_tied, tmp_path) -> str:
    return copy_model(qwen3_tied, tmp_path / "model")


def test_untouched_copy_loads(model_dir, reference_tokens):
    # The baseline the other tests edit: a plain copy loads and generates like the original.
    assert greedy_tokens(model_dir) == reference_tokens


# ---- tensors missing, unexpected, misshapen or repeated ---------------------------------------------


@pytest.mark.parametrize(
    "dropped",
    [
        "model.norm.weight",  # a plain parameter
        LAYER0 + "self_attn.k_proj.weight",  # one shard of the fused qkv_proj
        LAYER0 + "mlp.up_proj.weight",  # one shard of the fused gate_up_proj
        "model.embed_tokens.weight",  # also the tied LM head
    ],
)
def test_missing_tensor_is_named(model_dir, dropped):
    tensors = read_weights(model_dir)
    del tensors[dropped]
    write_weights(model_dir, {WEIGHTS: tensors})
    with pytest.raises(ValueError, match="not filled by the checkpoint") as info:
        LLM(model_dir, **SMALL)
    assert repr(dropped) in str(info.value)


def test_missing_untied_lm_head_is_named(qwen3_untied, tmp_path):
    path = copy_model(qwen3_untied, tmp_path / "model")
    tensors = read_weights(path)
    del tensors["lm_head.weight"]
    write_weights(path, {WEIGHTS: tensors})
    with pytest.raises(ValueError, match=r"'lm_head\.weight' was not filled"):
        LLM(path, **SMALL)


# A tensor of no module, and one of a layer the config does not have.
@pytest.mark.parametrize("extra", [LAYER0 + "self_attn.extra.weight", "model.layers.7.mlp.up_proj.weight"])
def test_unexpected_tensor_is_named(model_dir, extra):
    tensors = read_weights(model_dir)
    tensors[extra] = torch.zeros(4, 4)
    write_weights(model_dir, {WEIGHTS: tensors})
    with pytest.raises(ValueError, match="has no matching model parameter") as info:
        LLM(model_dir, **SMALL)
    assert repr(extra) in str(info.value) and WEIGHTS in str(info.value)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.norm.weight", (63,)),  # plain 1-D parameter
        (LAYER0 + "self_attn.q_proj.weight", (64, 60)),  # shard of the fused qkv_proj
        (LAYER0 + "mlp.gate_proj.weight", (120, 64)),  # shard of the fused gate_up_proj
        (LAYER0 + "self_attn.o_proj.weight", (64, 48)),  # row-parallel, too few input features
        (LAYER0 + "self_attn.o_proj.weight", (64, 80)),  # row-parallel, too many input features
        (LAYER0 + "mlp.down_proj.weight", (64, 256)),
        ("model.embed_tokens.weight", (600, 64)),  # a larger vocabulary than config.json says
        ("model.embed_tokens.weight", (500, 64)),  # a smaller one
    ],
)
def test_shape_mismatch_names_tensor_and_both_shapes(model_dir, name, shape):
    tensors = read_weights(model_dir)
    want = tuple(tensors[name].shape)
    tensors[name] = torch.zeros(shape)
    write_weights(model_dir, {WEIGHTS: tensors})
    with pytest.raises(ValueError, match="shape") as info:
        LLM(model_dir, **SMALL)
    msg = str(info.value)
    assert repr(name) in msg and str(want) in msg and str(shape) in msg, msg


def test_tensor_in_two_files_is_refused(model_dir):
    tensors = read_weights(model_dir)
    names = sorted(tensors)
    first = {k: tensors[k] for k in names[: len(names) // 2]}
    second = {k: tensors[k] for k in names[len(names) // 2 :]}
    dup = LAYER0 + "self_attn.v_proj.weight"
    assert dup in first or dup in second
    first[dup] = second[dup] = tensors[dup]
    write_weights(model_dir, {SHARDS[0]: first, SHARDS[1]: second})
    with pytest.raises(ValueError, match="more than once") as info:
        LLM(model_dir, **SMALL)
    assert repr(dup) in str(info.value)


def test_sharded_checkpoint_loads(model_dir, reference_tokens):
    # The same tensors split over two files (no duplicate) load like the single file.
    tensors = read_weights(model_dir)
    names = sorted(tensors)
    write_weights(
        model_dir,
        {
            SHARDS[0]: {k: tensors[k] for k in names[::2]},
            SHARDS[1]: {k: tensors[k] for k in names[1::2]},
        },
    )
    assert greedy_tokens(model_dir) == reference_tokens


def test_tied_embeddings_with_an_extra_lm_head_load(model_dir, reference_tokens):
    # Some tied checkpoints also store lm_head.weight; the tied head is the embedding whatever it holds.
    tensors = read_weights(model_dir)
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    write_weights(model_dir, {WEIGHTS: tensors})
    assert greedy_tokens(model_dir) == reference_tokens


def test_corrupt_safetensors_file_is_a_clear_error(model_dir):
    with open(os.path.join(model_dir, WEIGHTS), "r+b") as f:
        f.truncate(100)  # the header promises far more bytes than remain
    with pytest.raises(ValueError, match=WEIGHTS):
        LLM(model_dir, **SMALL)


# ---- integer tensors in an unquantized checkpoint ------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("model.norm.weight", torch.int8),  # a plain parameter
        (LAYER0 + "self_attn.k_proj.weight", torch.uint8),  # one shard of the fused qkv_proj
        (LAYER0 + "mlp.down_proj.weight", torch.int32),
        ("model.embed_tokens.weight", torch.bool),
    ],
)
def test_integer_tensor_without_quantization_config_is_refused(model_dir, name, dtype):
    tensors = read_weights(model_dir)
    tensors[name] = tensors[name].to(dtype)
    write_weights(model_dir, {WEIGHTS: tensors})
    with pytest.raises(ValueError, match="no quantization_config") as info:
        LLM(model_dir, **SMALL)
    msg = str(info.value)
    assert repr(name) in msg and str(dtype) in msg, msg


def build_model(config: Config) -> torch.nn.Module:
    """The model class for `config`, built on the CPU in float32 as the model runner builds it."""
    return get_model_class(resolve_architecture(config.hf_config))(config.hf_config)


def test_integer_tensor_with_quantization_config_is_not_this_check(model_dir):
    # The check keys on quantization_config: with one, load_model leaves integer tensors to the layers.
    tensors = read_weights(model_dir)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    write_weights(model_dir, {WEIGHTS: tensors})
    config = Config(model_dir)
    with pytest.raises(ValueError, match="no quantization_config"):
        load_model(build_model(config), model_dir)  # hf_config read from config.json
    config.hf_config.quantization_config = {"quant_method": "int8"}
    load_model(build_model(config), model_dir, hf_config=config.hf_config)


# ---- nothing from the directory is unpickled or imported ------------------------------------------------


class _CreatesMarker:
    """Unpickling this object opens (and so creates) the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path: str, marker: str, name: str = "pytorch_model.bin") -> None:
    with open(os.path.join(path, name), "wb") as f:
        pickle.dump({"model.norm.weight": _CreatesMarker(marker)}, f)


def test_pickle_only_directory_is_refused_without_unpickling(model_dir, tmp_path):
    marker = tmp_path / "unpickled"
    write_weights(model_dir, {})
    write_pickle_bomb(model_dir, str(marker))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle checkpoints are never loaded"):
        LLM(model_dir, **SMALL)
    assert not marker.exists()
    # The bomb works: unpickling it is what would have created the marker.
    with open(os.path.join(model_dir, "pytorch_model.bin"), "rb") as f:
        pickle.load(f)["model.norm.weight"].close()
    assert marker.exists()


def test_pickle_next_to_safetensors_is_ignored(model_dir, tmp_path, reference_tokens):
    marker = tmp_path / "unpickled"
    write_pickle_bomb(model_dir, str(marker))
    write_pickle_bomb(model_dir, str(marker), "model.pt")
    assert greedy_tokens(model_dir) == reference_tokens
    assert not marker.exists()


CUSTOM_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import PretrainedConfig, PreTrainedTokenizerFast


class CustomConfig(PretrainedConfig):
    model_type = "custom_model_type"


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def answer_yes(monkeypatch):
    """Answer "yes" to any interactive prompt (transformers asks before running remote code when it may);
    returns the prompts asked."""
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


AUTO_MAP = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """Where transformers would copy remote code before importing it: a temporary folder, not ~/.cache."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def write_custom_code(path: str, marker) -> None:
    with open(os.path.join(path, "custom_code.py"), "w") as f:
        f.write(CUSTOM_CODE.format(marker=str(marker)))


def test_auto_map_and_unsupported_architecture_import_nothing(model_dir, tmp_path, answer_yes, modules_cache):
    marker = tmp_path / "imported"
    write_custom_code(model_dir, marker)
    edit_config(
        model_dir,
        architectures=["CustomForCausalLM"],
        auto_map=AUTO_MAP,
    )
    with pytest.raises(ValueError, match=r"unsupported model architecture.*CustomForCausalLM"):
        LLM(model_dir, **SMALL)
    assert not marker.exists() and answer_yes == []


def test_auto_map_with_unknown_model_type_imports_nothing(model_dir, tmp_path, answer_yes, modules_cache):
    marker = tmp_path / "imported"
    write_custom_code(model_dir, marker)
    edit_config(
        model_dir,
        model_type="custom_model_type",
        architectures=["CustomForCausalLM"],
        auto_map=AUTO_MAP,
    )
    with pytest.raises(ValueError):
        LLM(model_dir, **SMALL)
    assert answer_yes == [], "asked whether to run the directory's code"
    assert not marker.exists()


def test_tokenizer_auto_map_imports_nothing(model_dir, tmp_path, answer_yes, modules_cache, reference_tokens):
    marker = tmp_path / "imported"
    write_custom_code(model_dir, marker)
    path = os.path.join(model_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(
        tokenizer_class="CustomTokenizer",
        auto_map={"AutoTokenizer": ["custom_code.CustomTokenizer", "custom_code.CustomTokenizer"]},
    )
    with open(path, "w") as f:
        json.dump(cfg, f)
    assert greedy_tokens(model_dir) == reference_tokens
    assert not marker.exists() and answer_yes == []


# ---- random weights (load_format="dummy") -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> str:
    """Qwen2 has biases on q/k/v, so all three kinds of parameter (norm, bias, other) occur."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), arch="Qwen2ForCausalLM")


def dummy_params(path: str, seed: int) -> dict[str, torch.Tensor]:
    model = build_model(Config(path, load_format="dummy"))
    load_dummy_weights(model, seed=seed, std=0.05)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_dummy_weights_fill_every_parameter(qwen2_dir):
    params = dummy_params(qwen2_dir, seed=0)
    kinds = {"norm": 0, "bias": 0, "other": 0}
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            kinds["norm"] += 1
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            kinds["bias"] += 1
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            kinds["other"] += 1
            assert p.std().item() == pytest.approx(0.05, rel=0.2), name
            assert abs(p.mean().item()) < 0.01, name
    assert all(kinds.values()), kinds


def test_dummy_weights_are_deterministic_by_seed(qwen2_dir):
    first, again, other = dummy_params(qwen2_dir, 3), dummy_params(qwen2_dir, 3), dummy_params(qwen2_dir, 4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_load_weights_dummy_reads_no_weight_file(qwen3_tied, tmp_path):
    # Only config.json and the tokenizer: load_weights fills the model from the seed and initializer_range.
    path = tmp_path / "m"
    os.makedirs(path)
    for name in os.listdir(qwen3_tied):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(qwen3_tied, name), path / name)
    config = Config(str(path), load_format="dummy", seed=5)
    model = build_model(config)
    load_weights(model, config)
    embed = model.state_dict()["model.embed_tokens.weight"]
    assert embed.std().item() == pytest.approx(config.hf_config.initializer_range, rel=0.1)
    reference = build_model(config)
    load_dummy_weights(reference, seed=5, std=config.hf_config.initializer_range)
    assert torch.equal(embed, reference.state_dict()["model.embed_tokens.weight"])


def test_load_weights_reads_safetensors_by_default(qwen3_tied):
    config = Config(qwen3_tied)
    model = build_model(config)
    load_weights(model, config)
    want = read_weights(qwen3_tied)["model.embed_tokens.weight"]
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], want)
