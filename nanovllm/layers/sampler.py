import torch
from torch import nn

from nanovllm.utils.compile import compilable


@compilable
def sample(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    # logits: [num_seqs, vocab]; temperatures: [num_seqs]
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperatures.clamp(min=1e-6).unsqueeze(1), dim=-1)
    noise = torch.empty_like(probs).exponential_(1).clamp_(min=1e-10)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)


class Sampler(nn.Module):
    """One token per row: argmax where the temperature is 0, otherwise a draw from
    softmax(logits / T) by the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) picks i
    with probability p_i)."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        return sample(logits, temperatures)
