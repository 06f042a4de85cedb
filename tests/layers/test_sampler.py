import torch

from nanovllm.layers.sampler import Sampler


def test_temperature_draws_follow_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0])
    temperature = 0.7
    n = 40000
    draws = Sampler()(logits.expand(n, -1).clone(), torch.full((n,), temperature))
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    # Binomial standard error is at most sqrt(0.25 / n) = 0.0025: allow four of them.
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    # A higher temperature flattens the distribution.
    hot = Sampler()(logits.expand(n, -1).clone(), torch.full((n,), 5.0))
    assert torch.bincount(hot, minlength=5).max() < torch.bincount(draws, minlength=5).max()


def test_zero_temperature_is_argmax_per_row():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    temps = torch.zeros(64)
    temps[::2] = 1.0
    out = Sampler()(logits, temps)
    assert torch.equal(out[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(out[::2], logits[::2].argmax(-1))  # 32 draws from flat rows: not all argmax
