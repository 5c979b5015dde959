"""Speculative decoding: greedy output == the target's greedy output; acceptance; Leviathan's rule is exact."""

import pytest
import torch
from tiny import model_of, random_sd, tiny_shape

from neox_progressive.eval.specdec import speculative_generate, target_generate, verify

TARGET = tiny_shape(hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, ffn_size=64, padded_vocab_size=64)
DRAFT = tiny_shape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_size=48, padded_vocab_size=64)
PROMPTS = [[1, 5, 9, 13, 2], [7], [3, 3, 3, 8, 40, 41, 42, 2, 9, 10, 11]]


@pytest.fixture(scope="module")
def models():
    target_sd = random_sd(TARGET, seed=0, std=0.2)
    near_sd = {k: v + 0.03 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=v.dtype)
               for k, v in target_sd.items()}
    return {"target": model_of(TARGET, target_sd), "near": model_of(TARGET, near_sd),
            "small": model_of(DRAFT, random_sd(DRAFT, seed=5, std=0.2))}


def plain_greedy(model, prompt, n):
    """Reference without a cache: recompute the whole sequence every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_the_target_as_draft_accepts_everything(models, prompt):
    t = models["target"]
    want = plain_greedy(t, prompt, 20)
    assert target_generate(t, prompt, 20).tokens == want
    res = speculative_generate(t, t, prompt, 20, draft_len=8)
    assert res.tokens == want
    assert res.acceptance_rate == 1.0
    assert res.rounds == 3  # 9 + 9 + 2 tokens: drafts of 8, 8, 1 (capped so a round never overshoots)


@pytest.mark.parametrize("draft", ["near", "small"])
@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_greedy_with_another_draft_gives_the_targets_output(models, draft, draft_len):
    t = models["target"]
    for prompt in PROMPTS:
        res = speculative_generate(models[draft], t, prompt, 25, draft_len=draft_len)
        assert res.tokens == plain_greedy(t, prompt, 25)
        assert res.drafted >= res.accepted
    if draft == "small":
        assert res.acceptance_rate < 1.0


def test_acceptance_tracks_how_close_the_draft_is(models):
    t = models["target"]
    near = sum(speculative_generate(models["near"], t, p, 30).acceptance_rate for p in PROMPTS)
    far = sum(speculative_generate(models["small"], t, p, 30).acceptance_rate for p in PROMPTS)
    assert near > far


def test_stops_at_end_of_text(models):
    t = models["target"]
    full = plain_greedy(t, PROMPTS[0], 30)
    eos = full[6]
    res = speculative_generate(models["near"], t, PROMPTS[0], 30, eos_id=eos)
    assert res.tokens == full[:full.index(eos) + 1]
    assert target_generate(t, PROMPTS[0], 30, eos_id=eos).tokens == res.tokens


def test_sampled_with_the_target_as_draft_accepts_everything(models):
    t = models["target"]
    res = speculative_generate(t, t, PROMPTS[0], 30, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert res.acceptance_rate == 1.0 and len(res.tokens) == 30


def test_leviathan_rule_samples_exactly_from_the_target():
    """With q != p, the first emitted token is distributed as p_1 and the first draft is kept with
    probability sum_x min(p(x), q(x)) (Leviathan et al. 2023, Theorem 3.5 / Definition 3.1)."""
    g = torch.Generator().manual_seed(0)
    V, k, n = 5, 2, 20000
    p = torch.randn(k + 1, V, generator=g) * 1.5
    q = torch.randn(k, V, generator=g) * 1.5
    pp, qq = torch.softmax(p, -1), torch.softmax(q, -1)
    first = torch.zeros(V)
    kept_first = 0
    for _ in range(n):
        drafts = [int(torch.multinomial(qq[i], 1, generator=g)) for i in range(k)]
        kept, nxt = verify(drafts, p, q, temperature=1.0, generator=g)
        emitted = drafts[0] if kept >= 1 else nxt
        first[emitted] += 1
        kept_first += kept >= 1
    tv = 0.5 * (first / n - pp[0]).abs().sum()
    assert tv < 0.02, (first / n, pp[0])
    assert kept_first / n == pytest.approx(float(torch.minimum(pp[0], qq[0]).sum()), abs=0.015)


def test_sampled_output_follows_the_target_distribution(models):
    """End to end: the first sampled token's frequencies match the target's softmax at the prompt."""
    t, d = models["target"], models["small"]
    prompt = [4, 8, 15]
    with torch.no_grad():
        want = torch.softmax(t(torch.tensor([prompt]))[0, -1], -1)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(64)
    n = 1500
    for _ in range(n):
        counts[speculative_generate(d, t, prompt, 2, draft_len=1, temperature=1.0, generator=g).tokens[0]] += 1
    assert 0.5 * (counts / n - want).abs().sum() < 0.08
