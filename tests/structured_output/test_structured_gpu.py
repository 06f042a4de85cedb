"""Structured outputs on the GPU (CUDA graphs, overlap scheduling, bf16 and fp32): the pinned bitmask's
side-stream copy and the mask kernel inside the engine. The constraint alone makes the outputs valid, and
the unconstrained rows of a mixed batch, greedy or seeded, give exactly the tokens they give alone (in
float32: in bf16 the GEMMs of other batch sizes may round differently, so there only their lengths)."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.structured_output.test_structured_outputs import PARAMS, assert_idle, check, constrained

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_batch_on_the_gpu(qwen3_tied, dtype):
    llm = LLM(qwen3_tied, kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512, dtype=dtype)
    try:
        prompts = random_prompts(8, [7, 19, 33, 12, 5, 40, 21, 9], seed=21)
        plain = [
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=5, max_tokens=40, ignore_eos=True),
        ]
        free = [plain[i % 2] for i in range(4)]
        alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], free, use_tqdm=False)]
        kinds = ["json", "choice", "regex", "grammar"]
        params = free + [constrained(**PARAMS[k]) for k in kinds]
        mixed = llm.generate(prompts, params, use_tqdm=False)
        if dtype == "float32":
            assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
        assert [len(o.outputs[0].token_ids) for o in mixed[:4]] == [40] * 4
        for kind, out in zip(kinds, mixed[4:]):
            assert out.outputs[0].finish_reason == "stop", out.outputs[0]
            check(kind, out.outputs[0].text)
        assert_idle(llm)
    finally:
        llm.exit()
