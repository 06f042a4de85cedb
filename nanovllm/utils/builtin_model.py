"""Random-weight checkpoints in Hugging Face format, built on first use into a cache directory.

`example.py` and `bench.py` use these when no real model is on disk: a tiny Qwen3 for trying the
API on a CPU, and one with Qwen3-0.6B's exact shapes for measuring speed. The weights are random,
so the text is gibberish, but every byte goes through the real loading code. The Qwen3-30B-A3B-shaped
MoE model (61 GB in bf16) is written without weights: config.json and the tokenizer only, to be run with
`load_format="dummy"` (random weights drawn on the device; its nanovllm_builtin.json says so).
"""

import json
import os
import shutil
import tempfile

import torch

CACHE_ENV = "NANOVLLM_CACHE"

# A few sentences to train the small tokenizer on; non-ASCII text so multi-byte characters occur.
_CORPUS = [
    "Hello, my name is nano-vllm and I generate text one token at a time.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "List all prime numbers within 100: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29.",
    "Introduce yourself in a few words. What is paged attention? Why does prefix caching help?",
    "Grüße aus München! Ça va très bien, merci. ¿Dónde está la biblioteca?",
    "你好，世界。今天天气很好。日本語のテキストも少しあります。",
    "Emoji are bytes too: 🙂 🚀 ✨. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_QWEN3 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.5,
)
# Qwen3-0.6B's published configuration (the reference benchmark model).
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    initializer_range=0.02,
)


# Qwen3-8B's published configuration: a shape where tensor parallelism pays off (16 GB of bf16 weights).
QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    initializer_range=0.02,
)


# Qwen3-30B-A3B's published configuration: 48 layers, 128 experts of width 768, top-8 (3.3B active).
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    initializer_range=0.02,
)


# Qwen3-8B's shapes as an AWQ checkpoint (AutoAWQ gemm, 4 bits, groups of 128, as Qwen3-8B-AWQ): about
# 5.7 GB, written without weights and run with load_format="dummy" (random packed integers and scales).
QWEN3_8B_AWQ = QWEN3_8B | dict(
    quantization_config={
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
)


# Built-in models by name: (configuration overrides, weight dtype).
BUILTIN_MODELS = {
    "tiny-qwen3": (TINY_QWEN3, torch.float32),
    "qwen3-0.6b-random": (QWEN3_0_6B, torch.bfloat16),
    "qwen3-8b-random": (QWEN3_8B, torch.bfloat16),
    "qwen3-30b-a3b-random": (QWEN3_30B_A3B, torch.bfloat16),
    "qwen3-8b-awq-random": (QWEN3_8B_AWQ, torch.float16),
}
# Architectures other than Qwen3ForCausalLM, by built-in name.
BUILTIN_ARCHITECTURES = {"qwen3-30b-a3b-random": "Qwen3MoeForCausalLM"}
# Built-in models written without weight files: engines load them with load_format="dummy".
DUMMY_WEIGHT_MODELS = frozenset({"qwen3-30b-a3b-random", "qwen3-8b-awq-random"})


def builtin_load_format(path: str) -> str | None:
    """The load_format a built-in checkpoint directory needs ("dummy" when it has no weights), or None
    for any other directory."""
    try:
        with open(os.path.join(path, "nanovllm_builtin.json")) as f:
            return json.load(f).get("load_format")
    except (OSError, ValueError):
        return None


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "nano-vllm")


def build_tokenizer(vocab_size: int, out_dir: str) -> None:
    """Train a byte-level BPE tokenizer with a chat template and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def write_random_checkpoint(
    out_dir: str, hf_config, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu"
) -> None:
    """Save random weights for `hf_config` as model.safetensors, with transformers' tensor names. The
    numbers are drawn on `device` (a GPU draws billions in a moment; the values differ from the CPU's)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    gen = torch.Generator(device).manual_seed(seed)
    std = float(getattr(hf_config, "initializer_range", 0.02))
    tensors = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen, device=device) * std
        tensors[name] = t.to(dtype).cpu().contiguous()
        del t
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand the memory back before an engine sizes its KV cache
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def build_qwen3_checkpoint(
    out_dir: str,
    overrides: dict,
    dtype: torch.dtype,
    tokenizer_vocab: int = 400,
    device: str = "cpu",
    architecture: str = "Qwen3ForCausalLM",
    weights: bool = True,
) -> str:
    """Write config.json, a small tokenizer and (unless `weights=False`) random weights for a model of
    `architecture` (Qwen3 or Qwen3-MoE) into `out_dir`."""
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(tokenizer_vocab, out_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_cls(**overrides, eos_token_id=tok.eos_token_id, bos_token_id=None)
    config.architectures = [architecture]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out_dir)
    if weights:
        write_random_checkpoint(out_dir, config, dtype, device=device)
    return out_dir


def get_builtin_model(name: str = "tiny-qwen3") -> str:
    """Path of a built-in random checkpoint, built once: 'tiny-qwen3', 'qwen3-0.6b-random',
    'qwen3-8b-random' (16 GB; its weights are drawn on the GPU when there is one),
    'qwen3-30b-a3b-random' or 'qwen3-8b-awq-random' (no weight file: load them with load_format="dummy",
    see `builtin_load_format`)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose from {sorted(BUILTIN_MODELS)}")
    path = os.path.join(cache_root(), name)
    dummy = name in DUMMY_WEIGHT_MODELS
    if os.path.isfile(os.path.join(path, "nanovllm_builtin.json" if dummy else "model.safetensors")):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    overrides, dtype = BUILTIN_MODELS[name]
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        device = "cuda" if name == "qwen3-8b-random" and torch.cuda.is_available() else "cpu"
        arch = BUILTIN_ARCHITECTURES.get(name, "Qwen3ForCausalLM")
        build_qwen3_checkpoint(tmp, overrides, dtype, device=device, architecture=arch, weights=not dummy)
        marker = {"name": name, "random_weights": True} | ({"load_format": "dummy"} if dummy else {})
        with open(os.path.join(tmp, "nanovllm_builtin.json"), "w") as f:
            json.dump(marker, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
