"""Small elementwise ops that `torch.compile` fuses on the GPU (RMSNorm, rotary, SiLU-and-mul, sampler).

Layers call these through `CompilableOp`, which runs the plain function until `enable_compilation()`
swaps in a compiled version. The functions are pure (tensors and floats in, tensors out), so one
compiled graph serves every layer instance. Shapes follow torch.compile's default ("automatic
dynamic"): the first call compiles for its exact shapes, and a dimension that later changes (the
token or batch count) becomes symbolic in one recompilation, while the model dimensions (hidden size,
vocabulary) stay static. With `dynamic=True` the vocabulary was symbolic too, and Inductor tunes a
symbolic size for whatever it first saw: on the H100 the sampler at batch 256 x 151,936 took 9.8 ms
per call in a process that ran after the GPU tests (tiny vocabularies, same on-disk compile cache) and
0.26 ms on a fresh machine; static model dimensions keep such kernels apart.
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
            op.impl = torch.compile(op.fn)


def disable_compilation() -> None:
    for op in _REGISTRY:
        op.impl = op.fn
