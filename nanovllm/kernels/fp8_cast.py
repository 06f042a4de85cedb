"""The fp32 -> float8_e4m3fn cast shared by the FP8 kernels (GEMM activations, KV-cache store).

Values are clamped to +-448 (e4m3's largest finite value; the GPU conversion saturates there too)
and rounded to nearest. Under TRITON_INTERPRET=1 the interpreter's own cast truncates and loses the
carry into the exponent (31.3 becomes 16, not 32), so `EMULATE_CAST` rounds to the e4m3 grid first;
an exactly representable value then casts exactly.
"""

import triton
import triton.language as tl

from nanovllm.kernels.device import interpreting

FP8_MAX = 448.0


def emulate_cast() -> bool:
    """The EMULATE_CAST argument for a launch: True under the Triton interpreter."""
    return interpreting()


@triton.jit
def to_fp8(x, EMULATE_CAST: tl.constexpr):
    """fp32 -> e4m3, saturating at +-448, round to nearest."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE_CAST:
        a = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(a, 1e-30)))
        e = tl.minimum(tl.maximum(e, -6.0), 8.0)  # below 2^-6: e4m3's subnormal spacing 2^-9
        step = tl.exp2(e - 3.0)  # 3 mantissa bits
        r = tl.minimum(tl.floor(a / step + 0.5) * step, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)
