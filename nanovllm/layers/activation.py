import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.compile import compilable


@compilable
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # 2 x [num_tokens, d]
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """SwiGLU gate: silu(x[..., :d]) * x[..., d:] for an input whose last dim is 2 * d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
