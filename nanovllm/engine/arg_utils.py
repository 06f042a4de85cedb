"""EngineArgs: the engine's keyword arguments as a dataclass and as command-line flags, as in vLLM.

    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = vars(parser.parse_args())   # every key is an `LLM(**kwargs)` keyword
    llm = LLM(**args)

The fields are generated from `Config` (same names, types and defaults), so the two cannot drift.
"""

import argparse
import dataclasses
import typing
from typing import Any

from nanovllm.config import ATTENTION_BACKENDS, DTYPE_CHOICES, KV_CACHE_DTYPES, LOAD_FORMATS, Config
from nanovllm.quantization import QUANTIZATION_METHODS

# `--model` when the script sets none: vLLM's default model, resolved through the hub cache.
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"

# Choices offered on the command line; Config validates every value again.
_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": DTYPE_CHOICES,
    "attention_backend": ATTENTION_BACKENDS,
    "load_format": LOAD_FORMATS,
    "quantization": QUANTIZATION_METHODS,
    "kv_cache_dtype": KV_CACHE_DTYPES,
}

# One help text per Config field (a test checks that none is missing). argparse fills %(default)s.
_HELP: dict[str, str] = {
    "model": "Local model directory or Hugging Face Hub repo id (default: %(default)s).",
    "max_num_batched_tokens": "Token budget of one prefill step; longer prompts are chunked "
    "(default: %(default)s).",
    "max_num_seqs": "Most sequences in one step (default: %(default)s).",
    "max_model_len": "Longest sequence, prompt plus completion; capped by the model's "
    "max_position_embeddings (default: %(default)s).",
    "gpu_memory_utilization": "Share of GPU memory the engine may use, in (0, 1] (default: %(default)s).",
    "tensor_parallel_size": "Number of GPUs to split the model over, 1..8 (default: %(default)s).",
    "data_parallel_size": "Engine replicas run as Ray actors by LLM, each with tensor_parallel_size devices "
    "(needs the ray extra; default: %(default)s).",
    "enforce_eager": "Run decode eagerly, without CUDA graphs (default: %(default)s).",
    "kvcache_block_size": "Tokens per KV-cache block, a multiple of 16 (default: %(default)s).",
    "num_kvcache_blocks": "KV-cache blocks; -1 sizes the cache from free memory (default: %(default)s).",
    "device": "'auto' (CUDA when available, else CPU), 'cuda', 'cuda:N' or 'cpu' (default: %(default)s).",
    "dtype": "Compute dtype; 'auto' is the checkpoint's on GPU and float32 on CPU (default: %(default)s).",
    "attention_backend": "Attention implementation (default: %(default)s).",
    "overlap_scheduling": "Prepare step N+1 on the CPU while the GPU runs step N (default: %(default)s).",
    "torch_compile": "torch.compile the small elementwise ops; unset: on for CUDA, off for CPU "
    "(default: %(default)s).",
    "cpu_kvcache_bytes": "On CPU with --num-kvcache-blocks -1: the KV-cache budget in bytes "
    "(default: %(default)s).",
    "tp_shm_bytes": "Tensor parallelism: bytes of the shared-memory buffer carrying each call to the "
    "workers, >= 65536 (default: %(default)s).",
    "tp_timeout_s": "Tensor parallelism: seconds to wait on a worker or a collective (default: %(default)s).",
    "tokenizer": "Tokenizer directory or hub repo id; unset: the model's (default: %(default)s).",
    "trust_remote_code": "Accepted for vLLM compatibility but refused when set: nano-vllm never runs "
    "code shipped with a checkpoint.",
    "load_format": "'auto'/'safetensors' read the weight files; 'dummy' uses random weights "
    "(default: %(default)s).",
    "seed": "Engine-level random seed (default: %(default)s).",
    "enable_prefix_caching": "Reuse the KV cache of prompt prefixes already computed (default: %(default)s).",
    "quantization": "Weight quantization method; unset: the checkpoint's quantization_config, if any. "
    "'fp8' also quantizes an unquantized checkpoint at load (default: %(default)s).",
    "kv_cache_dtype": "KV-cache element type: 'auto' (the compute dtype) or 'fp8'/'fp8_e4m3' "
    "(default: %(default)s).",
}


def _cli_type(annotation: Any) -> type:
    """The command-line type of a field: bool, int or float when the annotation is one of those (or
    that or None), else str (`str | None`, `str | torch.dtype`: a flag always gives a string)."""
    kinds = [t for t in (typing.get_args(annotation) or (annotation,)) if t is not type(None)]
    if len(kinds) == 1 and kinds[0] in (bool, int, float):
        return kinds[0]
    return str


def _with_config_fields(cls: type) -> type:
    """Make `cls` a dataclass with one field per init field of Config: same name, type and default
    (`model` defaults to DEFAULT_MODEL, as in vLLM, where Config has no default)."""
    annotations: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if not f.init:
            continue
        annotations[f.name] = f.type
        if f.name == "model":
            setattr(cls, f.name, DEFAULT_MODEL)
        elif f.default is not dataclasses.MISSING:
            setattr(cls, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(cls, f.name, dataclasses.field(default_factory=f.default_factory))
        else:
            raise TypeError(f"Config field {f.name!r} has no default; EngineArgs needs one")
    cls.__annotations__ = annotations
    return dataclasses.dataclass(cls)


@_with_config_fields
class EngineArgs:
    """Every `LLM(**kwargs)` keyword, with Config's defaults (fields generated from Config)."""

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one `--dashed-name` flag per field to `parser` (its dest is the field name) and return it.
        Booleans get `--name`/`--no-name`; `--torch-compile`/`--no-torch-compile` unset means None."""
        # vLLM's scripts pass either a parser or an argument group of theirs (argparse never shows a
        # group nested in a group in --help).
        is_group = isinstance(parser, argparse._ArgumentGroup)
        group = parser if is_group else parser.add_argument_group("engine arguments")
        for f in dataclasses.fields(EngineArgs):
            if f.name not in _HELP:
                raise RuntimeError(
                    f"EngineArgs field {f.name!r} has no help text in nanovllm/engine/arg_utils.py"
                )
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = dict(dest=f.name, default=f.default, help=_HELP[f.name])
            kind = _cli_type(f.type)
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                if f.name in _CHOICES:
                    kwargs["choices"] = _CHOICES[f.name]
            group.add_argument(flag, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The EngineArgs in a parsed namespace; attributes that are not engine fields are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `LLM(**kwargs)` (`model` included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
