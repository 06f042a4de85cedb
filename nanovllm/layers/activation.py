import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU gate: silu(x[..., :d]) * x[..., d:] for an input whose last dim is 2 * d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # 2 x [num_tokens, d]
        return F.silu(gate) * up
