"""Small elementwise ops that `torch.compile` fuses on the GPU (RMSNorm, rotary, SiLU-and-mul, sampler).

Layers call these through `CompilableOp`, which runs the plain function until `enable_compilation()`
swaps in a compiled version. The functions are pure (tensors and floats in, tensors out), so one
compiled graph serves every layer instance; `dynamic=True` keeps new token counts from recompiling.
"""

from collections.abc import Callable

import torch

_REGISTRY: list["CompilableOp"] = []


class CompilableOp:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.impl = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        _REGISTRY.append(self)

    def __call__(self, *args, **kwargs):
        return self.impl(*args, **kwargs)


def compilable(fn: Callable) -> CompilableOp:
    return CompilableOp(fn)


def enable_compilation() -> None:
    """Compile every registered op (process-wide, idempotent)."""
    for op in _REGISTRY:
        if op.impl is op.fn:
            op.impl = torch.compile(op.fn, dynamic=True)


def disable_compilation() -> None:
    for op in _REGISTRY:
        op.impl = op.fn
