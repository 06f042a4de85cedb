"""Shared fixtures: tiny random-weight checkpoints written by transformers itself, loaded through our
real loader, and transformers' own model as the numerical reference."""

import os

import pytest
import torch

from nanovllm.utils.builtin_model import TINY_QWEN3, build_tokenizer

# The built-in tiny Qwen3's shapes. Its large initializer range makes logits peaky, so greedy argmax
# does not flip on rounding differences between implementations. Tying is set per checkpoint.
TINY = {k: v for k, v in TINY_QWEN3.items() if k != "tie_word_embeddings"} | dict(
    max_position_embeddings=1024, rope_theta=10000.0
)


def write_hf_checkpoint(path, arch: str = "Qwen3ForCausalLM", seed: int = 0, **overrides) -> str:
    """Save a random transformers model of `arch` (config.json + model.safetensors + tokenizer)."""
    import transformers

    os.makedirs(path, exist_ok=True)
    build_tokenizer(400, str(path))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(
        **{**TINY, "tie_word_embeddings": True, **overrides},
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def load_hf_model(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy completion of one prompt, without EOS stopping."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def generate_spied(llm, prompts, params, monkeypatch) -> tuple[list[list[int]], list[int], list[int]]:
    """`prompts`' tokens, and what the scheduler did meanwhile (in this process: rank 0): the sequences
    preempted, and per allocation the tokens that came from the prefix cache."""
    from nanovllm.engine.block_manager import BlockManager
    from nanovllm.engine.scheduler import Scheduler

    preempted, cached = [], []
    preempt, allocate = Scheduler.preempt, BlockManager.allocate

    def spy_preempt(self, seq):
        preempted.append(seq.seq_id)
        return preempt(self, seq)

    def spy_allocate(self, seq, *args):
        allocate(self, seq, *args)
        cached.append(seq.num_cached_tokens)

    with monkeypatch.context() as m:
        m.setattr(Scheduler, "preempt", spy_preempt)
        m.setattr(BlockManager, "allocate", spy_allocate)
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [o["token_ids"] for o in outs], preempted, cached


def assert_greedy_matches_hf(llm, model, prompts: list[list[int]], max_tokens: int) -> None:
    """The engine's greedy completions (EOS ignored) equal transformers' token for token."""
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert out["token_ids"] == hf_greedy(model, prompt, max_tokens)


@pytest.fixture(scope="session")
def qwen3_tied(tmp_path_factory) -> str:
    """Tied embeddings, 4 query heads over 2 KV heads."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("qwen3_tied"))


@pytest.fixture(scope="session")
def qwen3_untied(tmp_path_factory) -> str:
    """Untied LM head, no GQA (4 query heads, 4 KV heads)."""
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("qwen3_untied"), seed=1, tie_word_embeddings=False, num_key_value_heads=4
    )


@pytest.fixture(scope="session")
def hf_tied(qwen3_tied):
    return load_hf_model(qwen3_tied)


def random_prompts(n: int, lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
