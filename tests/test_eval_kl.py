"""App. F KL between members: zero on itself, chunked == a dense float64 recomputation, both directions, top-1
agreement, the two-level mean over examples of different lengths, the per-example distribution."""

import statistics

import numpy as np
import pytest
import torch
from tiny import model_of, random_sd, tiny_shape

from neox_progressive.eval.kl import distribution, examples_kl, kl_from_logits, pair_kl

SMALL = tiny_shape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48, padded_vocab_size=64)
LARGE = tiny_shape(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=6, ffn_size=64, padded_vocab_size=64)


@pytest.fixture(scope="module")
def pair():
    return model_of(SMALL, random_sd(SMALL, seed=1, std=0.2)), model_of(LARGE, random_sd(LARGE, seed=2, std=0.2))


def batches(n=3, b=2, t=13, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def dense_kl(p_model, q_model, data, vocab):
    """Independent reference: full logits from the models' own forward, float64, explicit formula, App. F averaging."""
    per_example = []
    with torch.no_grad():
        for x in data:
            lp = torch.log_softmax(p_model(x)[..., :vocab].double(), -1)
            lq = torch.log_softmax(q_model(x)[..., :vocab].double(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)                      # (B, T): per position
            per_example += kl.mean(-1).tolist()                     # mean over positions, per example
    return sum(per_example) / len(per_example)


def dense_rows(p_model, q_model, x, vocab):
    """Per position, float64 from the models' own full forward: KL(p||q), KL(q||p), same argmax."""
    with torch.no_grad():
        lp = torch.log_softmax(p_model(x)[..., :vocab].double(), -1)
        lq = torch.log_softmax(q_model(x)[..., :vocab].double(), -1)
    return ((lp.exp() * (lp - lq)).sum(-1), (lq.exp() * (lq - lp)).sum(-1),
            (lp.argmax(-1) == lq.argmax(-1)).double())


def test_kl_of_a_model_with_itself_is_zero(pair):
    small, _ = pair
    res = pair_kl(small, small, batches())
    assert abs(res.kl) < 1e-6 and abs(res.reverse) < 1e-6 and res.top1 == 1.0
    assert res.examples == 6 and res.positions == 6 * 13


@pytest.mark.parametrize("position_chunk,vocab_chunk", [(1024, None), (5, None), (7, 9), (1, 64), (26, 100)])
def test_chunked_kl_equals_dense(pair, position_chunk, vocab_chunk):
    small, large = pair
    data = batches()
    want = dense_kl(small, large, data, 64)
    got = pair_kl(small, large, data, position_chunk=position_chunk, vocab_chunk=vocab_chunk)
    assert want > 0.05  # the models really differ
    assert got.kl == pytest.approx(want, rel=1e-5)


def test_kl_over_the_real_vocabulary_only(pair):
    small, large = pair
    data = batches(vocab=50)
    got = pair_kl(small, large, data, vocab_size=50, vocab_chunk=16)
    assert got.kl == pytest.approx(dense_kl(small, large, data, 50), rel=1e-5)
    assert abs(got.kl - dense_kl(small, large, data, 64)) > 1e-3  # the padded rows would change it


def test_kl_is_not_symmetric_and_the_direction_is_small_first(pair):
    _, large = pair
    sd = random_sd(SMALL, seed=1, std=0.2)
    sd["head.weight"] = sd["head.weight"] * 4  # a much sharper small member: the two directions differ a lot
    small = model_of(SMALL, sd)
    data = batches()
    forward, backward = dense_kl(small, large, data, 64), dense_kl(large, small, data, 64)
    assert abs(forward - backward) > 0.2 * max(forward, backward)
    got = pair_kl(small, large, data).kl
    assert got == pytest.approx(forward, rel=1e-5)
    assert got != pytest.approx(backward, rel=1e-3)
    assert pair_kl(large, small, data).kl == pytest.approx(backward, rel=1e-5)


def test_kl_from_logits_vocab_chunks_match_one_shot():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, 1000, generator=g) * 3, torch.randn(4, 5, 1000, generator=g) * 3
    one = kl_from_logits(a, b)
    assert torch.allclose(kl_from_logits(a, b, vocab_chunk=128), one, rtol=1e-5, atol=1e-6)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a.double()),
                                            torch.distributions.Categorical(logits=b.double()))
    assert torch.allclose(one.double(), ref, rtol=1e-5)


@pytest.mark.parametrize("position_chunk,vocab_chunk", [(None, None), (3, 7), (1, 64)])
def test_documents_of_different_lengths_two_level_mean_is_not_the_token_mean(pair, position_chunk, vocab_chunk):
    """App. F: mean over positions per example, then over examples. With unequal lengths this differs from the
    flat mean over all tokens; each example alone (no padding) in the reference."""
    small, large = pair
    g = torch.Generator().manual_seed(4)
    lengths = [2, 17, 5, 30, 1, 9, 11]
    docs = [torch.randint(0, 64, (n,), generator=g) for n in lengths]
    fwd, rev, top = [], [], []
    for d in docs:
        f, r, t = dense_rows(small, large, d[None], 64)
        fwd.append(f[0])
        rev.append(r[0])
        top.append(t[0])
    two_level = sum(float(f.mean()) for f in fwd) / len(docs)
    flat = float(torch.cat(fwd).mean())
    assert abs(two_level - flat) > 0.02 * two_level      # the test can tell the two averages apart
    got = examples_kl(small, large, [d.tolist() for d in docs], batch_size=3, position_chunk=position_chunk,
                      vocab_chunk=vocab_chunk)
    assert got.kl == pytest.approx(two_level, rel=1e-5)
    assert got.token_mean == pytest.approx(flat, rel=1e-5)
    assert got.reverse == pytest.approx(sum(float(r.mean()) for r in rev) / len(docs), rel=1e-5)
    assert got.top1 == pytest.approx(sum(float(t.mean()) for t in top) / len(docs), abs=1e-12)
    assert got.lengths == lengths and got.positions == sum(lengths) and got.unit == "documents"
    assert got.per_example == pytest.approx([float(f.mean()) for f in fwd], rel=1e-5)   # in the order given
    assert 0 < got.top1 < 1


def test_top1_agreement_and_reverse_direction():
    """A sharpened, perturbed copy of a model: the two directions differ and the top-1 often agrees."""
    sd = random_sd(LARGE, seed=2, std=0.2)
    g = torch.Generator().manual_seed(5)
    near = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    near["head.weight"] = near["head.weight"] * 3
    small, large = model_of(LARGE, near), model_of(LARGE, sd)
    data = batches()
    got = pair_kl(small, large, data, vocab_size=60, vocab_chunk=16)
    f, r, t = zip(*(dense_rows(small, large, x, 60) for x in data))
    assert got.reverse == pytest.approx(float(torch.cat(r).mean(-1).mean()), rel=1e-5)
    assert got.top1 == pytest.approx(float(torch.cat(t).mean()), abs=1e-12)
    assert got.reverse != pytest.approx(got.kl, rel=0.1)
    assert 0.2 < got.top1 < 1


def test_distribution_of_per_example_values():
    vals = [float(x) for x in np.random.default_rng(0).gamma(1.0, 0.3, 1001)]
    cuts = statistics.quantiles(vals, n=1000, method="inclusive")    # 999 cut points: the k/1000 quantiles
    got = distribution(vals)
    assert got["median"] == pytest.approx(statistics.median(vals))
    assert got["p90"] == pytest.approx(cuts[899]) and got["p99"] == pytest.approx(cuts[989])
    assert got["p99.9"] == pytest.approx(cuts[998]) and got["max"] == max(vals)


@pytest.mark.parametrize("vocab_chunk", [None, 24])
def test_large_logits_take_the_shifted_path(vocab_chunk):
    """Logits in the hundreds (a very sharp member): exp must be taken after subtracting the row max."""
    sd = random_sd(SMALL, seed=1, std=0.2)
    sd["head.weight"] = sd["head.weight"] * 150
    small, (_, large) = model_of(SMALL, sd), (None, model_of(LARGE, random_sd(LARGE, seed=2, std=0.2)))
    data = batches(n=1)
    with torch.no_grad():
        assert float(small(data[0]).abs().max()) > 100
    got = pair_kl(small, large, data, vocab_chunk=vocab_chunk)
    f, r, _ = dense_rows(small, large, data[0], 64)
    assert got.kl == pytest.approx(float(f.mean(-1).mean()), rel=1e-5)
    assert got.reverse == pytest.approx(float(r.mean(-1).mean()), rel=1e-5)


@pytest.mark.parametrize("V", [5000, 50304, 4096 + 17, 4096])
def test_argmax_rows_is_argmax(V):
    """The blocked argmax of the KL's top-1 agreement: the first maximum, as torch.argmax, with ties across and within
    blocks, a maximum in the tail that is not a whole block, rows that are views of a wider buffer, and NaN."""
    from neox_progressive.eval.kl import argmax_rows

    g = torch.Generator().manual_seed(V)
    buf = torch.randn(9, V + 3, generator=g)
    x = buf[:, :V] if V % 2 else torch.randn(9, V, generator=g)
    x[1, :] = 0.0                                     # all tied: index 0
    x[2, [70, 3000]] = 100.0                          # tie across blocks: the first
    x[3, [130, 131]] = 100.0                          # tie within a block
    x[4, V - 1] = 100.0                               # the last column (the tail when V % 64)
    x[5, [V - 1, V - 2]] = 100.0
    x[6, 77] = float("nan")                           # argmax takes NaN as the maximum
    x[7, :] = -torch.inf
    x[8, [10, 4000]] = torch.inf
    want = x.argmax(-1)
    assert torch.equal(argmax_rows(x), want), (argmax_rows(x), want)
    assert torch.equal(argmax_rows(x, block=128), want)
