"""Start-up compiles what a prefill through the KV cache runs: the cache-reading warm-up step, and prefill
block tables padded to one width class, so that no step of a run meets a kernel variant start-up missed."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import PREFILL_TABLE_COLUMNS
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=64, max_num_batched_tokens=64, max_num_seqs=4)


def record_prefills(llm: LLM) -> list:
    """Wrap the backend's prefill: each call appends its step's block tables (None: K/V from the batch)."""
    backend = llm.model_runner.backend
    calls: list = []
    prefill = backend.prefill

    def recording(q, k, v, k_cache, v_cache, meta, *args, **kwargs):
        calls.append(None if meta.block_tables is None else meta.block_tables.clone())
        return prefill(q, k, v, k_cache, v_cache, meta, *args, **kwargs)

    backend.prefill = recording
    return calls


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_warmup_prefill_reads_the_cache_and_leaves_it_zeroed(qwen3_tied, kv_cache_dtype):
    """The start-up step (run on CUDA, called by hand here) stores K/V and attends through the paged
    cache, in every layer, with an FP8 cache or without; it changes neither the cache nor later outputs."""
    prompts = random_prompts(3, [5, 20, 40], seed=3)
    outputs = []
    for warm_up in (False, True):
        llm = LLM(qwen3_tied, **ENGINE, kv_cache_dtype=kv_cache_dtype)
        try:
            runner = llm.model_runner
            if warm_up:
                calls = record_prefills(llm)
                runner._warmup_cache_reads()
                assert len(calls) == len(runner.attention_layers)
                for tables in calls:
                    assert tables is not None and tables.shape == (1, PREFILL_TABLE_COLUMNS)
                    assert tables[0, 0].item() == 0 and (tables[0, 1:] == -1).all()
                assert not runner.kv_cache.view(torch.uint8).any()
            outputs.append([o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)])
        finally:
            llm.exit()
    assert outputs[1] == outputs[0]


def test_prefill_block_tables_are_padded_to_one_width_class(qwen3_tied):
    """Chunked prompts of 1 to 7 blocks (and an FP8 cache, read in every prefill) give tables whose
    width is a multiple of PREFILL_TABLE_COLUMNS: Triton compiles one variant of the paged prefill for
    all of them (an integer argument of 1, or a multiple of 16, is a variant of its own)."""
    prompts = random_prompts(4, [9, 30, 70, 110], seed=5)
    outputs = {}
    for dtype in ("auto", "fp8"):
        llm = LLM(qwen3_tied, **ENGINE, kv_cache_dtype=dtype)
        try:
            calls = record_prefills(llm)
            outputs[dtype] = llm.generate(prompts, GREEDY, use_tqdm=False)
        finally:
            llm.exit()
        tables = [t for t in calls if t is not None]
        assert tables, "no prefill read the cache"
        assert all(t.shape[1] % PREFILL_TABLE_COLUMNS == 0 for t in tables)
        if dtype == "fp8":
            assert all(t is not None for t in calls)
    assert all(len(o["token_ids"]) == GREEDY.max_tokens for o in outputs["fp8"])
