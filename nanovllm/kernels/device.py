"""Facts that kernels choose their launches by: a CUDA device's (read once per device), or whether Triton's
interpreter runs them."""

import functools
import os

import torch


def interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET=1: kernels run on the CPU, with no inline PTX,
    no libdevice and its own float8 cast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def sm_count(device: torch.device, cpu_default: int) -> int:
    """Streaming multiprocessors of a CUDA device; `cpu_default` for a CPU tensor (the Triton
    interpreter), so that split counts stay small there."""
    if device.type != "cuda":
        return cpu_default
    return _properties(_index(device)).multi_processor_count


def device_name(device: torch.device) -> str:
    return _properties(_index(device)).name


def compute_capability(device: torch.device) -> tuple[int, int]:
    props = _properties(_index(device))
    return props.major, props.minor
