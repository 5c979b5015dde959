"""App. F KL between members: zero on itself, chunked == a dense float64 recomputation, the stated direction."""

import pytest
import torch
from tiny import model_of, random_sd, tiny_shape

from neox_progressive.eval.kl import kl_from_logits, pair_kl

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


def test_kl_of_a_model_with_itself_is_zero(pair):
    small, _ = pair
    res = pair_kl(small, small, batches())
    assert abs(res.kl) < 1e-6
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
