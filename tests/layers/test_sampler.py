import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors, exponential, hashed_uniform, truncate_logits


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


def test_seeded_draws_follow_softmax():
    """Counter-based noise (one key per row) gives the same distribution as torch's generator."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0])
    n = 40000
    keys = torch.randint(0, 2**32, (n, 2), generator=gen, dtype=torch.int64)
    params = SamplingTensors(torch.full((n,), 0.7), keys=keys)
    freq = torch.bincount(Sampler()(logits.expand(n, -1).clone(), params), minlength=5).double() / n
    expected = torch.softmax(logits.double() / 0.7, dim=-1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_exponential_noise_is_positive_and_finite_at_the_grid_ends():
    # 0 and the largest 24-bit uniform: E = 0 would make its token win whatever its probability.
    e = exponential(torch.tensor([0.0, 1.0 - 2.0**-24, 0.5]))
    assert torch.all(e > 0) and torch.all(torch.isfinite(e))
    keys = torch.randint(0, 2**32, (4, 2), dtype=torch.int64)
    u = hashed_uniform(keys, torch.arange(50000))
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u, hashed_uniform(keys, torch.arange(50000)))


def test_all_greedy_flag_skips_the_draw():
    logits = torch.randn(8, 100)
    params = SamplingTensors(torch.zeros(8), all_greedy=True)
    assert torch.equal(Sampler()(logits, params), logits.argmax(-1))


def test_ties_at_a_truncation_boundary_are_all_kept():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, -1.0]])
    out = truncate_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.nonzero(out[0] > float("-inf")).flatten().tolist() == [1, 2, 4]
    # top-p: the three tied tokens hold 3e2 / (3e2 + e + 1) of the mass; 0.5 is reached within the tie.
    out = truncate_logits(logits, torch.tensor([6]), torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.nonzero(out[0] > float("-inf")).flatten().tolist() == [1, 2, 4]


def test_top_k_1_is_greedy_even_with_tied_maxima():
    logits = torch.tensor([[0.5, 3.0, 3.0, 1.0]]).expand(200, -1).clone()
    params = SamplingTensors(
        torch.ones(200),
        top_k=torch.ones(200, dtype=torch.int64),
        top_p=torch.ones(200),
        min_p=torch.zeros(200),
    )
    assert torch.all(Sampler()(logits, params) == 1)  # argmax's first index, as temperature 0 picks


def test_untruncated_seeded_row_draws_the_same_beside_truncating_rows():
    """A batch where some row truncates masks logits by thresholds; a row that does not truncate gets
    -inf and must draw exactly what it draws when no row truncates (seeded rows stay reproducible)."""
    gen = torch.Generator().manual_seed(5)
    n, vocab = 64, 1000
    logits = torch.randn(n, vocab, generator=gen) * 3
    keys = torch.randint(0, 2**32, (n, 2), generator=gen, dtype=torch.int64)
    temps = torch.full((n,), 0.9)
    plain = Sampler()(logits, SamplingTensors(temps, keys=keys))
    top_k = torch.full((n,), vocab)
    top_k[::2] = 5
    truncating = SamplingTensors(temps, keys=keys, top_k=top_k, top_p=torch.ones(n), min_p=torch.zeros(n))
    mixed = Sampler()(logits, truncating)
    assert torch.equal(mixed[1::2], plain[1::2])
    top5 = logits.topk(5, dim=-1).indices
    assert torch.all((top5[::2] == mixed[::2, None]).any(dim=-1))
    assert not torch.equal(mixed[::2], plain[::2])  # 32 rows: truncation changed some draws


def test_warm_up_runs_every_draw_variant(monkeypatch):
    """The engine's start-up warm-up must reach each variant of the draw (seeded or not, truncating or
    not), so that none is compiled for the first time while serving; greedy comes back as argmax."""
    import nanovllm.layers.sampler as sampler_module

    seen = set()
    draw = sampler_module.sample

    def spy(logits, temperatures, keys, thresholds=None):
        seen.add((keys is not None, thresholds is not None))
        return draw(logits, temperatures, keys, thresholds)

    monkeypatch.setattr(sampler_module, "sample", spy)
    Sampler().warm_up(torch.randn(6, 300))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
