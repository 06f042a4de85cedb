"""Bad input through the public API: a clear ValueError/TypeError, and the engine stays usable."""

import json
import os
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_tied):
    engine = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64)
    yield engine
    engine.exit()


def copy_model(src, dst, drop=(), edit_config=None):
    shutil.copytree(src, dst)
    for name in drop:
        for f in os.listdir(dst):
            if f.endswith(name):
                os.remove(os.path.join(dst, f))
    if edit_config:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return str(dst)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_directory_without_config(qwen3_tied, tmp_path):
    path = copy_model(qwen3_tied, tmp_path / "m", drop=("config.json",))
    with pytest.raises(ValueError, match="config.json"):
        LLM(path)


def test_directory_without_safetensors(qwen3_tied, tmp_path):
    path = copy_model(qwen3_tied, tmp_path / "m", drop=(".safetensors",))
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    with pytest.raises(ValueError, match=r"safetensors.*pytorch_model\.bin"):
        LLM(path)


def test_unsupported_architecture(qwen3_tied, tmp_path):
    path = copy_model(
        qwen3_tied, tmp_path / "m", edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"])
    )
    with pytest.raises(ValueError, match="unsupported model architecture.*Qwen3ForCausalLM"):
        LLM(path)


def test_llm_engine_refuses_data_parallel_replicas(qwen3_tied):
    from nanovllm.engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="one replica.*data_parallel_size=2"):
        LLMEngine(qwen3_tied, data_parallel_size=2)


def test_unknown_keyword(qwen3_tied):
    with pytest.raises(TypeError, match="unknown engine argument.*max_num_seq\\b"):
        LLM(qwen3_tied, max_num_seq=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kvcache_block_size=24), "multiple of 16"),
        (dict(kvcache_block_size=0), ">= 1"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(tensor_parallel_size=9), "tensor_parallel_size"),
        (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
        (dict(dtype="float8"), "dtype"),
        (dict(attention_backend="triton", device="cpu"), "needs a CUDA device"),
        (dict(max_num_seqs=0), "max_num_seqs"),
    ],
)
def test_invalid_config_values(qwen3_tied, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(qwen3_tied, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_types():
    with pytest.raises(TypeError, match="max_tokens"):
        SamplingParams(max_tokens=2.5)
    assert SamplingParams(temperature=0).temperature == 0.0  # greedy is allowed


@pytest.mark.parametrize(
    "prompt, exc, match",
    [
        ([], ValueError, "empty"),
        ("", ValueError, "empty"),
        ([1, 2, 512], ValueError, "outside the vocabulary"),
        ([-1, 2], ValueError, "outside the vocabulary"),
        ([1] * 65, ValueError, "max_model_len"),
        ([1.5, 2], TypeError, "token ids"),
        (None, TypeError, "prompt"),
    ],
)
def test_bad_prompts_leave_engine_usable(llm, prompt, exc, match):
    good = random_prompts(2, [5, 9])
    with pytest.raises(exc, match=match):
        llm.generate([good[0], prompt], GREEDY, use_tqdm=False)
    with pytest.raises(exc, match=match):
        llm.add_request(prompt, GREEDY)
    assert llm.is_finished()  # nothing half-queued
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    out = llm.generate(good, GREEDY, use_tqdm=False)
    assert [len(o["token_ids"]) for o in out] == [4, 4]
    llm.block_manager.check_integrity()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_request_larger_than_cache_is_refused(qwen3_tied):
    small = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=2, max_model_len=64)
    with pytest.raises(ValueError, match="need 3 KV blocks of 16 tokens, but the cache has only 2"):
        small.add_request(list(range(40)), GREEDY)
    # A prompt that fits but whose completion could not: refused too, instead of preempting forever.
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request(list(range(20)), SamplingParams(temperature=0.0, max_tokens=30))
    assert small.is_finished()
    out = small.generate([list(range(20))], GREEDY, use_tqdm=False)
    assert len(out[0]["token_ids"]) == 4
    assert small.block_manager.num_free_blocks == 2
    small.exit()


def test_mismatched_sampling_params_list(llm):
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(random_prompts(3, [4]), [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(random_prompts(1, [4]), {"temperature": 0}, use_tqdm=False)
