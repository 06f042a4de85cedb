"""Engine configuration: every keyword argument of `LLM(model, **kwargs)` is a field here."""

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.layers.rotary_embedding import rope_max_position
from nanovllm.quantization import QuantizationConfig, get_quantization_config
from nanovllm.utils.hub import TOKENIZER_FILE_PATTERNS, resolve_model_path
from nanovllm.utils.tokenizer import check_tokenizer_files

# The PyTorch attention path gathers K/V in tiles of 16 tokens, and the Triton kernels tile the
# block in multiples of 16: a block size must be a positive multiple of this.
KV_BLOCK_SIZE_MULTIPLE = 16
# flash-attn's paged kernels need page sizes that are multiples of 256 tokens.
FLASH_ATTN_BLOCK_SIZE_MULTIPLE = 256
# Largest tensor-parallel group we support (one host, up to 8 GPUs).
MAX_TENSOR_PARALLEL_SIZE = 8
# Smallest shared-memory segment rank 0 may use to send calls to the tensor-parallel workers.
MIN_TP_SHM_BYTES = 64 << 10

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# vLLM's other names for the same dtypes; `Config.dtype` holds the canonical name after validation.
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DTYPE_CHOICES = ("auto", *_DTYPES, *_DTYPE_ALIASES)
ATTENTION_BACKENDS = ("auto", "flash-attn", "triton", "torch")
# "auto" and "safetensors" read the *.safetensors files; "dummy" fills random weights (no weight files).
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# vLLM's KV-cache dtypes we serve: "auto" is the compute dtype; "fp8" and "fp8_e4m3" both mean e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(slots=True)
class Config:
    """Validated engine settings. `hf_config` is read from `model/config.json`."""

    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # Engine replicas, each with tensor_parallel_size devices, run as Ray actors by `LLM` (vLLM's name).
    data_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    # Beyond the original: where and in which precision to run.
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cuda", "cuda:N" or "cpu"
    # "auto" (checkpoint dtype on GPU, float32 on CPU), "float32"/"float", "float16"/"half", "bfloat16" or
    # a torch.dtype of those three; stored as the canonical name ("float32", "float16", "bfloat16").
    dtype: str | torch.dtype = "auto"
    attention_backend: str = "auto"  # "auto", "flash-attn", "triton" or "torch"
    # Prepare step N+1 on the CPU while the GPU runs step N (False: one step at a time, for debugging).
    overlap_scheduling: bool = True
    # torch.compile the small elementwise ops: None means on for CUDA, off for CPU.
    torch_compile: bool | None = None
    # On CPU, `num_kvcache_blocks=-1` sizes the KV cache from this many bytes (see README).
    cpu_kvcache_bytes: int = 2 << 30
    # Tensor parallelism: size of the shared-memory segment carrying each call (method name and
    # pickled arguments) from rank 0 to the workers, and the seconds any rank waits for a peer (process
    # group start-up, collectives, worker replies) before giving up.
    tp_shm_bytes: int = 4 << 20
    tp_timeout_s: float = 60.0
    # vLLM's names from here on.
    # Tokenizer directory or hub repo id; None: the model's. Holds the resolved local directory afterwards.
    tokenizer: str | None = None
    # Refused when True: nano-vllm never runs code shipped with a checkpoint.
    trust_remote_code: bool = False
    # How weights are loaded: one of LOAD_FORMATS ("dummy" needs no weight file, for tests and benchmarks).
    load_format: str = "auto"
    # Engine-level random seed (None: not seeded); the engine derives its generators from it.
    seed: int | None = None
    # Reuse the KV blocks of a prompt prefix already computed (hash-chained full blocks).
    enable_prefix_caching: bool = True
    # Weight quantization (nanovllm.quantization): None serves the checkpoint as its config.json says;
    # a method name must match a quantized checkpoint's, or quantizes an unquantized one at load
    # ("fp8": per-channel FP8 weights, per-token FP8 activations).
    quantization: str | None = None
    # KV-cache element type: one of KV_CACHE_DTYPES.
    kv_cache_dtype: str = "auto"
    hf_config: PretrainedConfig = field(init=False, repr=False)
    # The quantization format resolved from `quantization` and the checkpoint (None: unquantized).
    quant_config: QuantizationConfig | None = field(init=False, default=None, repr=False)
    # Token ids that end a sequence (the tokenizer's and generation config's EOS); set by the engine.
    eos_token_ids: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self._check_options()
        self._check_numbers()
        self._check_model_dir()
        self._resolve_tokenizer()
        self.hf_config = AutoConfig.from_pretrained(self.model, trust_remote_code=False)
        self.quant_config = get_quantization_config(self.hf_config, self.quantization, self.model)
        if getattr(self.hf_config, "max_position_embeddings", None) is not None:
            # Capped by the model's limit: max_position_embeddings, stretched by a yarn, dynamic or
            # linear rope scaling as vLLM derives it (Qwen3 with yarn factor 4: 131,072).
            self.max_model_len = min(self.max_model_len, rope_max_position(self.hf_config))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    def _check_options(self) -> None:
        """The non-numeric options, checked before any file or the hub is looked at."""
        if not isinstance(self.trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be a bool, got {type(self.trust_remote_code).__name__}")
        if self.trust_remote_code:
            raise ValueError(
                "trust_remote_code=True is not supported: nano-vllm never runs code shipped with a "
                "checkpoint; it serves only the architectures it implements (see README, Supported models)"
            )
        if not isinstance(self.load_format, str) or self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, os.PathLike)):
            raise TypeError(
                "tokenizer must be None or a local directory or hub repo id, "
                f"got {type(self.tokenizer).__name__}"
            )
        self.dtype = _canonical_dtype(self.dtype)
        if self.quantization is not None and not isinstance(self.quantization, str):
            raise TypeError(
                f"quantization must be None or a method name, got {type(self.quantization).__name__}"
            )
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")

    def _check_model_dir(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(
                f"model must be a local directory or a hub repo id, got {type(self.model).__name__}"
            )
        self.model = resolve_model_path(os.fspath(self.model), "model")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model directory {self.model!r} has no config.json")
        if self.load_format == "dummy":
            return  # random weights: no weight file is read
        names = os.listdir(self.model)
        if not any(n.endswith(".safetensors") for n in names):
            others = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            why = (
                f" (found {', '.join(sorted(others))}: pickle checkpoints are never loaded, "
                "convert them to safetensors)"
                if others
                else ""
            )
            raise ValueError(f"model directory {self.model!r} has no *.safetensors weight files{why}")

    def _resolve_tokenizer(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.model
        else:
            self.tokenizer = resolve_model_path(
                os.fspath(self.tokenizer), "tokenizer", TOKENIZER_FILE_PATTERNS
            )
        check_tokenizer_files(self.tokenizer)  # here, so a missing tokenizer fails before weights load

    def _check_numbers(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

        for name in (
            "max_num_batched_tokens",
            "max_num_seqs",
            "max_model_len",
            "kvcache_block_size",
            "tensor_parallel_size",
            "data_parallel_size",
            "cpu_kvcache_bytes",
        ):
            positive_int(name)
        if self.kvcache_block_size % KV_BLOCK_SIZE_MULTIPLE:
            raise ValueError(
                f"kvcache_block_size must be a positive multiple of {KV_BLOCK_SIZE_MULTIPLE}, "
                f"got {self.kvcache_block_size}"
            )
        if not 1 <= self.tensor_parallel_size <= MAX_TENSOR_PARALLEL_SIZE:
            raise ValueError(
                f"tensor_parallel_size must be in 1..{MAX_TENSOR_PARALLEL_SIZE}, "
                f"got {self.tensor_parallel_size}"
            )
        if isinstance(self.tp_shm_bytes, bool) or not isinstance(self.tp_shm_bytes, int):
            raise TypeError(f"tp_shm_bytes must be an int, got {type(self.tp_shm_bytes).__name__}")
        if self.tp_shm_bytes < MIN_TP_SHM_BYTES:
            raise ValueError(f"tp_shm_bytes must be >= {MIN_TP_SHM_BYTES} (64 KiB), got {self.tp_shm_bytes}")
        if (
            isinstance(self.tp_timeout_s, bool)
            or not isinstance(self.tp_timeout_s, (int, float))
            or not self.tp_timeout_s > 0
        ):
            raise ValueError(f"tp_timeout_s must be a positive number of seconds, got {self.tp_timeout_s!r}")
        if isinstance(self.num_kvcache_blocks, bool) or not isinstance(self.num_kvcache_blocks, int):
            raise TypeError(
                f"num_kvcache_blocks must be an int, got {type(self.num_kvcache_blocks).__name__}"
            )
        if self.num_kvcache_blocks != -1 and self.num_kvcache_blocks < 1:
            raise ValueError(
                f"num_kvcache_blocks must be -1 (size automatically) or >= 1, got {self.num_kvcache_blocks}"
            )
        if (
            not isinstance(self.gpu_memory_utilization, (int, float))
            or not 0.0 < self.gpu_memory_utilization <= 1.0
        ):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("enforce_eager", "overlap_scheduling", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.torch_compile is not None and not isinstance(self.torch_compile, bool):
            raise TypeError(f"torch_compile must be None, True or False, got {self.torch_compile!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    # ---- values resolved once the machine is known -------------------------------------------

    def resolve_device(self) -> torch.device:
        """The device the engine runs on; 'auto' means CUDA when available."""
        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"device={self.device!r} was asked for but CUDA is not available on this machine"
                )
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device={self.device!r}: this machine has {torch.cuda.device_count()} GPU(s)"
                )
        return dev

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype; 'auto' is the checkpoint's dtype on GPU and float32 on CPU."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        ckpt = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(ckpt, str):
            ckpt = _DTYPES.get(ckpt.removeprefix("torch."), torch.bfloat16)
        return ckpt if ckpt in _DTYPES.values() else torch.bfloat16


def _canonical_dtype(dtype: object) -> str:
    """'auto', or the canonical name ("float32", "float16", "bfloat16") of a dtype name, alias or
    torch.dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if isinstance(dtype, str) and dtype in DTYPE_CHOICES:
        return _DTYPE_ALIASES.get(dtype, dtype)
    raise ValueError(f"dtype must be one of {DTYPE_CHOICES} or a torch.dtype, got {dtype!r}")


def make_config(model: Any, kwargs: dict[str, Any]) -> Config:
    """Build a Config from `LLM(model, **kwargs)`, refusing unknown keywords by name."""
    allowed = Config.field_names()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"unknown engine argument(s) {', '.join(unknown)}; "
            f"valid ones are: {', '.join(a for a in allowed if a != 'model')}"
        )
    return Config(model, **kwargs)
