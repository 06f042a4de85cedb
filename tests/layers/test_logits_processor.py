"""LogitsProcessors against a per-row, per-token Python reference of vLLM's rules (CPU)."""

import random
from collections import Counter

import pytest
import torch

from nanovllm.engine.sequence import PLACEHOLDER_TOKEN, Sequence
from nanovllm.layers.logits_processor import (
    INITIAL_SLOTS,
    LogitsProcessors,
    bad_words_token_ids,
    check_vocab,
)
from nanovllm.sampling_params import SamplingParams

VOCAB = 50
EOS = frozenset({0})
NEG_INF = float("-inf")
# The same ops run on a GPU; conftest skips the "cuda" cases where there is none.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_seq(seq_id: int, prompt: list[int], completion=(), **params) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(**params), block_size=16)
    for t in completion:
        seq.append_token(t)
    return seq


def random_tokens(rng: random.Random, n: int, vocab: int = VOCAB) -> list[int]:
    # Few distinct values, so that tokens repeat and counts go above 1.
    return [rng.randrange(1, min(vocab, 12)) for _ in range(n)]


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * 3  # [rows, vocab], both signs


def reference(logits: torch.Tensor, seqs: list[Sequence], stop_ids, tokenizer=None) -> torch.Tensor:
    """vLLM's rules, one row and one token at a time."""
    out = logits.float().clone()
    vocab = out.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_logits_processing:
            continue
        row = out[i]
        done = [t for t in seq.completion_token_ids if t != PLACEHOLDER_TOKEN]
        if p.allowed_token_ids is not None:
            for t in range(vocab):
                if t not in p.allowed_token_ids:
                    row[t] = NEG_INF
        for ids in reference_bad_words(p.bad_words, tokenizer) if p.bad_words else []:
            k = len(ids) - 1
            if k <= len(done) and done[len(done) - k :] == ids[:-1]:
                row[ids[-1]] = NEG_INF
        if seq.num_completion_tokens < p.min_tokens:
            for t in set(stop_ids) | set(p.stop_token_ids or []):
                row[t] = NEG_INF
        for t, b in (p.logit_bias or {}).items():
            row[t] += b
        counts = Counter(done)
        prompt = set(seq.prompt_token_ids)
        for t in range(vocab):
            if t in prompt or counts[t] > 0:
                if row[t] > 0:
                    row[t] = row[t] / p.repetition_penalty
                else:
                    row[t] = row[t] * p.repetition_penalty
            row[t] -= p.frequency_penalty * counts[t]
            if counts[t] > 0:
                row[t] -= p.presence_penalty
    return out


def reference_bad_words(words: list[str], tokenizer) -> list[list[int]]:
    result = []
    for w in words:
        plain = tokenizer.encode(w.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
        result.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            result.append(spaced)
    return result


def run(proc: LogitsProcessors, seqs, logits, stop_ids=EOS):
    batch = proc.prepare(seqs, stop_ids)
    assert batch is not None
    return batch, proc.apply(logits, batch)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from nanovllm.utils.builtin_model import build_tokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer(400, path)
    return AutoTokenizer.from_pretrained(path)


PENALTY_CASES = [
    dict(presence_penalty=0.7),
    dict(presence_penalty=-1.5),
    dict(frequency_penalty=0.6),
    dict(frequency_penalty=-0.4),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.5),
    dict(presence_penalty=0.3, frequency_penalty=0.5, repetition_penalty=1.3),
]


@pytest.mark.parametrize("params", PENALTY_CASES)
def test_penalties_alone_and_combined(params):
    rng = random.Random(1)
    seqs = [make_seq(i, random_tokens(rng, 7), random_tokens(rng, 9), **params) for i in range(4)]
    seqs.append(make_seq(4, [1, 2], [], **params))  # nothing generated yet: only the prompt counts
    logits = random_logits(len(seqs))
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=8)
    _, got = run(proc, seqs, logits)
    torch.testing.assert_close(got, reference(logits, seqs, EOS))
    assert not torch.equal(got, logits)


def test_logit_bias_and_allowed_token_ids():
    seqs = [
        make_seq(0, [3, 4], [5], logit_bias={1: 5.0, 7: -2.5, 49: 100}),
        make_seq(1, [3, 4], [5], allowed_token_ids=[2, 9, 11]),
        make_seq(2, [3], [], allowed_token_ids=[2, 9], logit_bias={9: 1.5, 10: 4.0}),  # 10: stays -inf
    ]
    logits = random_logits(3)
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=8)
    _, got = run(proc, seqs, logits)
    torch.testing.assert_close(got, reference(logits, seqs, EOS))
    assert torch.isfinite(got[1]).sum() == 3 and torch.isfinite(got[2]).sum() == 2
    assert got[2, 9] == logits[2, 9] + 1.5


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    stop_ids = frozenset({0, 1})
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=8)
    seqs = [
        make_seq(0, [5, 6], [7, 8], min_tokens=3, stop_token_ids=[9]),  # 2 < 3: banned
        make_seq(1, [5, 6], [7, 8, 9], min_tokens=3, stop_token_ids=[9]),  # reached: free
        make_seq(2, [5], [], min_tokens=1),
        make_seq(3, [5], [7, PLACEHOLDER_TOKEN], min_tokens=3),  # the placeholder is a completion token
    ]
    logits = random_logits(4)
    _, got = run(proc, seqs, logits, stop_ids)
    torch.testing.assert_close(got, reference(logits, seqs, stop_ids))
    assert got[0, [0, 1, 9]].eq(NEG_INF).all() and torch.isfinite(got[0, 2:9]).all()
    assert torch.equal(got[1], logits[1])
    assert got[3, [0, 1]].eq(NEG_INF).all() and torch.isfinite(got[3, 2:]).all()
    # One more token reaches min_tokens: the same slot is no longer banned.
    seqs[0].append_token(7)
    _, got = run(proc, seqs[:1], logits[:1], stop_ids)
    assert torch.equal(got[0], logits[0])


def test_bad_words_single_and_multi_token(tokenizer):
    vocab = len(tokenizer)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    single = next(w for w in ("a", "e", "o", "x") if len(enc(w)) == 1)
    fox, the = enc("fox"), enc("the")
    # The words' shapes under this tokenizer, on which the cases below rely.
    assert len(fox) == 2 and len(enc(" fox")) == 2 and enc(" fox")[0] != fox[0]  # both forms banned
    assert len(the) == 2 and len(enc(" the")) == 1  # the spaced form has another length: not banned
    xyzzy = enc("xyzzy")
    assert len(xyzzy) == 4 and len(enc(" xyzzy")) == 5  # a long word, spaced form not banned
    words = [single, "fox", "the", "xyzzy"]
    assert bad_words_token_ids(words, tokenizer, vocab) == reference_bad_words(words, tokenizer)
    prompt = enc("Hello there")
    seqs = [
        make_seq(0, prompt, [], bad_words=words),  # nothing generated: only the single-token word
        make_seq(1, prompt, enc("a quick")[:2] + fox[:1], bad_words=words),  # ends with fox's first token
        make_seq(2, prompt, enc(" the lazy") + enc(" fox")[:1], bad_words=words),  # " fox" started
        make_seq(3, prompt, the[:1], bad_words=words),  # "the" started
        make_seq(4, prompt, fox[:1] + [5], bad_words=words),  # fox's first token, but not at the end
        make_seq(5, prompt, enc(" fox")[:1]),  # no bad words
        make_seq(6, prompt, [5] + xyzzy[:3], bad_words=words),  # xyzzy's three first tokens
        make_seq(7, prompt, [5, 6] + xyzzy[1:3], bad_words=words),  # only its second and third
        make_seq(8, prompt + xyzzy[:1], xyzzy[1:3], bad_words=words),  # its first token is in the prompt
    ]
    logits = random_logits(len(seqs), vocab)
    proc = LogitsProcessors(vocab, torch.device("cpu"), max_rows=8, tokenizer=tokenizer)
    _, got = run(proc, seqs, logits)
    torch.testing.assert_close(got, reference(logits, seqs, EOS, tokenizer))
    single_id = enc(single)[0]
    assert got[:5, single_id].eq(NEG_INF).all()
    assert got[1, fox[1]] == NEG_INF and got[2, enc(" fox")[1]] == NEG_INF and got[3, the[1]] == NEG_INF
    assert got[4, fox[1]] != NEG_INF and got[0, fox[1]] != NEG_INF
    assert torch.equal(got[5], logits[5])
    assert got[6, xyzzy[-1]] == NEG_INF
    assert got[7, xyzzy[-1]] != NEG_INF and got[8, xyzzy[-1]] != NEG_INF  # the completion alone counts


def test_needs_host_tokens(tokenizer):
    proc = LogitsProcessors(400, torch.device("cpu"), max_rows=4, tokenizer=tokenizer)
    single = next(w for w in ("a", "e", "o") if len(tokenizer.encode(w, add_special_tokens=False)) == 1)
    assert proc.needs_host_tokens(SamplingParams(bad_words=["fox"]))
    assert not proc.needs_host_tokens(SamplingParams(bad_words=[single]))
    assert not proc.needs_host_tokens(SamplingParams(presence_penalty=1.0))


def test_multi_token_bad_word_with_a_placeholder_tail_raises(tokenizer):
    proc = LogitsProcessors(400, torch.device("cpu"), max_rows=4, tokenizer=tokenizer)
    seq = make_seq(0, [5, 6], [7, PLACEHOLDER_TOKEN], bad_words=["fox"])
    with pytest.raises(RuntimeError, match="needs_host_tokens"):
        proc.prepare([seq], EOS)


def test_bad_words_need_a_tokenizer():
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=4)
    with pytest.raises(ValueError, match="SamplingParams.bad_words"):
        proc.prepare([make_seq(0, [1], bad_words=["x"])], EOS)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_need_nothing_are_unchanged_bitwise_in_a_mixed_batch(device):
    rng = random.Random(3)
    plain = dict(temperature=0.8, top_k=5, logprobs=2)
    kinds = [
        plain,
        dict(presence_penalty=0.5, frequency_penalty=0.2),
        plain,
        dict(logit_bias={3: 2.0}),
        dict(min_tokens=5),
        plain,
        dict(repetition_penalty=1.5, allowed_token_ids=list(range(20))),
        plain,
    ]
    seqs = [make_seq(i, random_tokens(rng, 6), random_tokens(rng, 4), **k) for i, k in enumerate(kinds)]
    logits = random_logits(len(seqs), seed=5).to(torch.bfloat16).to(device)
    original = logits.clone()
    proc = LogitsProcessors(VOCAB, torch.device(device), max_rows=16)
    batch, got = run(proc, seqs, logits)
    assert got.dtype == torch.float32 and got.shape == logits.shape and got.device == logits.device
    assert torch.equal(logits, original)  # the input is not modified
    assert batch.rows.tolist() == [1, 3, 4, 6]
    for i in (0, 2, 5, 7):
        assert torch.equal(got[i], logits[i].float())
    torch.testing.assert_close(got.cpu(), reference(logits.cpu(), seqs, EOS))


def test_no_row_needs_processing_gives_none():
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=4)
    seqs = [make_seq(i, [1, 2], [3], temperature=0.5, top_p=0.9) for i in range(3)]
    assert proc.prepare(seqs, EOS) is None
    assert proc.capacity == 0 and proc.num_held == 0  # nothing allocated


@pytest.mark.parametrize("device", DEVICES)
def test_record_then_apply_reflects_the_new_counts(device):
    rng = random.Random(4)
    kinds = [
        dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.4),
        dict(temperature=0.5),  # not processed: its rows of `tokens` are skipped
        dict(frequency_penalty=1.0),
        dict(logit_bias={2: 3.0}),  # processed, no penalties
    ]
    seqs = [make_seq(i, random_tokens(rng, 5), random_tokens(rng, 3), **k) for i, k in enumerate(kinds)]
    proc = LogitsProcessors(VOCAB, torch.device(device), max_rows=8)
    for step in range(6):
        logits = random_logits(len(seqs), seed=10 + step)
        batch, got = run(proc, seqs, logits.to(device))
        torch.testing.assert_close(got.cpu(), reference(logits, seqs, EOS), msg=f"step {step}")
        # Draw from a small set so that the counts grow past 1.
        tokens = torch.tensor([rng.randrange(1, 6) for _ in seqs], dtype=torch.int64)
        proc.record(batch, tokens.to(device))
        for seq, t in zip(seqs, tokens.tolist()):
            seq.append_token(t)
    proc.check_integrity()


def test_placeholders_are_not_counted_at_slot_creation():
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=4)
    seq = make_seq(0, [4], [3, 3, PLACEHOLDER_TOKEN], frequency_penalty=1.0, presence_penalty=0.5)
    logits = random_logits(1)
    batch, got = run(proc, [seq], logits)
    torch.testing.assert_close(got, reference(logits, [seq], EOS))
    expected_3 = logits[0, 3] - 2 * 1.0 - 0.5
    torch.testing.assert_close(got[0, 3], expected_3)
    assert torch.equal(
        got[0, [t for t in range(VOCAB) if t != 3]], logits[0, [t for t in range(VOCAB) if t != 3]]
    )
    # The device learns the placeholder's value through record (it was the row's draw of this step).
    proc.record(batch, torch.tensor([7]))
    seq.token_ids[-1] = 7
    _, got = run(proc, [seq], logits)
    torch.testing.assert_close(got, reference(logits, [seq], EOS))


def test_release_frees_slots_and_a_reused_slot_starts_clean():
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=4)
    a = make_seq(0, [1, 2, 3], [4, 4], presence_penalty=1.0, repetition_penalty=2.0, logit_bias={5: 9.0})
    b = make_seq(1, [6], [7], allowed_token_ids=[1, 2, 3])
    logits = random_logits(2)
    batch, _ = run(proc, [a, b], logits)
    proc.record(batch, torch.tensor([4, 2]))
    a_slot = batch.slots[0].item()
    assert proc.num_held == 2
    proc.release([0, 99])  # an unknown id is ignored
    assert proc.num_held == 1
    proc.check_integrity()
    c = make_seq(2, [8], [], frequency_penalty=0.5)  # takes a's slot
    d = make_seq(3, [9], [], min_tokens=2)
    batch, got = run(proc, [c, d, b], random_logits(3, seed=1))
    assert batch.slots[0].item() == a_slot
    torch.testing.assert_close(got, reference(random_logits(3, seed=1), [c, d, b], EOS))
    proc.release([1, 2, 3])
    assert proc.num_held == 0
    proc.check_integrity()


def test_growing_past_the_initial_capacity_keeps_every_slot():
    rng = random.Random(7)
    n = INITIAL_SLOTS + 5
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=64)

    def params(i: int) -> dict:
        return dict(
            frequency_penalty=0.1 * (i % 5), repetition_penalty=1.0 + 0.1 * (i % 3), logit_bias={i: 1.0}
        )

    first = [make_seq(i, random_tokens(rng, 4), random_tokens(rng, 2), **params(i)) for i in range(3)]
    batch, _ = run(proc, first, random_logits(3))
    proc.record(batch, torch.tensor([1, 2, 3]))
    for seq, t in zip(first, (1, 2, 3)):
        seq.append_token(t)
    assert proc.capacity == INITIAL_SLOTS
    seqs = first + [
        make_seq(i, random_tokens(rng, 4), random_tokens(rng, 2), **params(i)) for i in range(3, n)
    ]
    logits = random_logits(n, seed=2)
    _, got = run(proc, seqs, logits)
    assert proc.capacity == 2 * INITIAL_SLOTS and proc.num_held == n
    torch.testing.assert_close(got, reference(logits, seqs, EOS))
    proc.check_integrity()


def test_more_sequences_than_max_rows_is_an_error():
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=2)
    seqs = [make_seq(i, [1], [], min_tokens=1) for i in range(3)]
    with pytest.raises(RuntimeError, match="max_rows=2"):
        proc.prepare(seqs, EOS)


def test_token_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="SamplingParams.allowed_token_ids"):
        check_vocab(SamplingParams(allowed_token_ids=[1, VOCAB]), VOCAB)
    with pytest.raises(ValueError, match="SamplingParams.logit_bias"):
        check_vocab(SamplingParams(logit_bias={VOCAB + 3: 1.0}), VOCAB)
    proc = LogitsProcessors(VOCAB, torch.device("cpu"), max_rows=2)
    good = make_seq(1, [1], logit_bias={3: 1.0})
    with pytest.raises(ValueError, match="SamplingParams.logit_bias"):
        proc.prepare([good, make_seq(0, [1], logit_bias={VOCAB: 1.0})], EOS)
    assert proc.num_held == 0  # the good row's new slot was given back
    proc.check_integrity()
    check_vocab(SamplingParams(allowed_token_ids=[VOCAB - 1], logit_bias={0: 1.0}), VOCAB)


@pytest.mark.parametrize("device", DEVICES)
def test_random_mixed_batches_match_the_reference(device):
    rng = random.Random(11)
    proc = LogitsProcessors(VOCAB, torch.device(device), max_rows=32)
    options = [
        lambda: dict(presence_penalty=rng.uniform(-2, 2)),
        lambda: dict(frequency_penalty=rng.uniform(-2, 2)),
        lambda: dict(repetition_penalty=rng.uniform(0.3, 3)),
        lambda: dict(min_tokens=rng.randrange(0, 6), stop_token_ids=[rng.randrange(VOCAB)]),
        lambda: dict(logit_bias={rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(3)}),
        lambda: dict(allowed_token_ids=rng.sample(range(VOCAB), 10)),
        lambda: dict(),
    ]
    seq_id = 0
    for trial in range(5):
        seqs = []
        for _ in range(10):
            kwargs = {}
            for option in rng.sample(options, rng.randrange(0, 4)):
                kwargs |= option()
            seqs.append(
                make_seq(seq_id, random_tokens(rng, 5), random_tokens(rng, rng.randrange(0, 6)), **kwargs)
            )
            seq_id += 1
        logits = random_logits(len(seqs), seed=100 + trial)
        batch = proc.prepare(seqs, EOS)
        got = logits if batch is None else proc.apply(logits.to(device), batch).cpu()
        torch.testing.assert_close(got, reference(logits, seqs, EOS), msg=f"trial {trial}")
        proc.release([s.seq_id for s in seqs])
        proc.check_integrity()
    assert proc.capacity == INITIAL_SLOTS  # released slots were reused
