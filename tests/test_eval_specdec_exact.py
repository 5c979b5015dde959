"""Sampled speculative decoding, checked exactly: every sequence of random choices is enumerated on a tiny
vocabulary, so the joint distribution of the first emitted tokens is computed, not sampled.

Leviathan et al. 2023 (Theorem 3.5): speculative sampling emits tokens distributed exactly as the target's own
sampling. With one draft token per round and two new tokens, the second token is the bonus token whenever the draft
is kept (it must come from p(. | prompt, d1), the target's distribution one position later), so drawing the bonus
from the wrong position changes the joint distribution of (t1, t2). The same enumeration runs transformers' assisted
generation (`do_sample=True`) on the HF exports of the same two models: its joint distribution, and its distribution
of accepted draft tokens, must equal ours.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive.eval import specdec
from neox_progressive.hf import export_hf
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

V = 4
SHAPE = tiny_shape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48, padded_vocab_size=V,
                   rms_norm_eps=1e-6)
PROMPT = [3, 1, 2]


class Paths:
    """Runs a function once per sequence of random choices (depth first); `choose(weights)` is every choice."""

    def __init__(self):
        self.stack: list[tuple[int, ...]] = []

    def choose(self, weights: list[float]) -> int:
        i = len(self.taken)
        if i < len(self.forced):
            c = self.forced[i]
        else:
            options = [j for j, w in enumerate(weights) if w > 0]
            c = options[0]
            self.stack += [tuple(self.taken) + (j,) for j in options[1:]]
        self.taken.append(c)
        self.prob *= weights[c]
        return c

    def run(self, fn) -> list[tuple[float, object]]:
        out = []
        self.stack = [()]
        while self.stack:
            self.forced, self.taken, self.prob = self.stack.pop(), [], 1.0
            result = fn()
            out.append((self.prob, result))
        return out


def joint(paths, n) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    for prob, (tokens, _) in paths:
        key = tuple(tokens[:n])
        out[key] = out.get(key, 0.0) + prob
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny forward passes: one thread avoids the thread pool's overhead (and contention on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    return {name: Transformer.from_state_dict(SHAPE, random_sd(SHAPE, seed=seed, std=0.25)).eval()
            for name, seed in (("target", 0), ("draft", 7))}


def target_joint(target, n) -> dict[tuple[int, ...], float]:
    """The target's own sampling: p(t1 | prompt) p(t2 | prompt, t1) ..., full forward passes in float64."""
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n):
            logits = target(torch.tensor([PROMPT + list(seq)])).double()[0]
            logp = torch.log_softmax(logits, -1)
            out[seq] = float(sum(logp[len(PROMPT) - 1 + i, t] for i, t in enumerate(seq)).exp())
    return out


def ours(models, monkeypatch, draft_len, n):
    paths = Paths()
    monkeypatch.setattr(specdec, "_sample", lambda probs, g: paths.choose(probs.double().tolist()))

    def accept(p_x, q_x, g, device):
        a = min(1.0, p_x / q_x)
        return paths.choose([a, 1.0 - a]) == 0

    monkeypatch.setattr(specdec, "_accept", accept)

    def fn():
        res = specdec.speculative_generate(models["draft"], models["target"], PROMPT, n, draft_len=draft_len,
                                           temperature=1.0)
        return res.tokens, res.accepted

    return paths.run(fn)


@pytest.mark.parametrize("draft_len,n", [(1, 2), (2, 3)])
def test_sampled_joint_distribution_equals_the_targets(models, monkeypatch, draft_len, n):
    paths = ours(models, monkeypatch, draft_len, n)
    assert sum(p for p, _ in paths) == pytest.approx(1.0, abs=1e-6)
    got, want = joint(paths, n), target_joint(models["target"], n)
    assert max(abs(got.get(k, 0.0) - v) for k, v in want.items()) < 2e-6
    bonus = sum(p for p, (tokens, acc) in paths if acc == draft_len)  # every draft kept: the bonus token was drawn
    assert 0.05 < bonus < 0.95          # both the bonus path and the rejection path carry real weight


def test_a_bonus_token_from_the_previous_position_is_caught(models, monkeypatch):
    """The test above fails for the bug it guards against: the bonus token drawn from p_k instead of p_{k+1}."""
    real = specdec.verify

    def wrong_bonus(draft_tokens, p, q, temperature, generator=None):
        k = len(draft_tokens)
        if k and temperature:
            p = torch.cat([p[:k], p[k - 1:k]])  # the bonus row replaced by the previous position's
        return real(draft_tokens, p, q, temperature, generator)

    monkeypatch.setattr(specdec, "verify", wrong_bonus)
    got, want = joint(ours(models, monkeypatch, 1, 2), 2), target_joint(models["target"], 2)
    assert max(abs(got.get(k, 0.0) - v) for k, v in want.items()) > 1e-3


transformers = pytest.importorskip("transformers")


def exported(tmp_path, name, model):
    sd = model.state_dict()
    write_checkpoint(tmp_path / name, SHAPE, sd)
    export_hf(CheckpointReader(tmp_path / name, SHAPE), tmp_path / f"{name}-hf")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"{name}-hf", torch_dtype=torch.float32).eval()


def theirs(target_hf, draft_hf, monkeypatch, draft_len, n):
    """transformers' assisted generation with do_sample=True, every torch.multinomial / torch.rand_like enumerated."""
    paths = Paths()

    def multinomial(probs, num_samples=1, **kw):
        flat = probs.reshape(-1, probs.shape[-1])
        assert flat.shape[0] == 1 and num_samples == 1
        w = (flat[0].double() / flat[0].double().sum()).tolist()
        return torch.tensor([[paths.choose(w)]], device=probs.device).reshape(*probs.shape[:-1], 1)

    def rand_like(ratio, **kw):  # transformers draws r ~ U(0, 1) and keeps the draft while r <= p/q
        vals = []
        for x in ratio.reshape(-1).tolist():
            a = min(1.0, x)
            vals.append(0.0 if paths.choose([a, 1.0 - a]) == 0 else x + 1.0)
        return torch.tensor(vals, dtype=ratio.dtype).reshape(ratio.shape)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(torch, "rand_like", rand_like)
    draft_hf.generation_config.num_assistant_tokens = draft_len
    draft_hf.generation_config.num_assistant_tokens_schedule = "constant"
    draft_hf.generation_config.assistant_confidence_threshold = 0.0
    matches = []
    from transformers.generation import candidate_generator

    original = candidate_generator.AssistedCandidateGenerator.update_candidate_strategy

    def record(self, input_ids, scores, num_matches):
        matches.append(int(num_matches))
        return original(self, input_ids, scores, num_matches)

    monkeypatch.setattr(candidate_generator.AssistedCandidateGenerator, "update_candidate_strategy", record)

    def fn():
        matches.clear()
        # eos: an id outside the vocabulary (transformers 4.38's assisted generation needs one; it is never sampled)
        out = target_hf.generate(torch.tensor([PROMPT]), assistant_model=draft_hf, max_new_tokens=n, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=V)
        return out[0, len(PROMPT):].tolist(), sum(matches)

    return paths.run(fn)


@pytest.mark.parametrize("draft_len,n", [(1, 2)])
def test_sampled_mode_equals_transformers_assisted_generation(models, tmp_path, monkeypatch, draft_len, n):
    target_hf, draft_hf = exported(tmp_path, "target", models["target"]), exported(tmp_path, "draft", models["draft"])
    hf_paths = theirs(target_hf, draft_hf, monkeypatch, draft_len, n)
    monkeypatch.undo()
    our_paths = ours(models, monkeypatch, draft_len, n)
    assert sum(p for p, _ in hf_paths) == pytest.approx(1.0, abs=1e-6)
    a, b = joint(hf_paths, n), joint(our_paths, n)
    assert max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b)) < 2e-6

    def accepted(paths):
        out: dict[int, float] = {}
        for prob, (_, acc) in paths:
            out[acc] = out.get(acc, 0.0) + prob
        return out

    ha, oa = accepted(hf_paths), accepted(our_paths)
    assert set(ha) == set(oa) and len(oa) > 1
    assert all(abs(ha[k] - oa[k]) < 2e-6 for k in oa)
