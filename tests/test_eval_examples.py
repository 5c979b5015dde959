"""The held-out examples: KL documents (end-of-document token + document, truncated), prompts sampled with a seed from
documents long enough, NeoX windows for perplexity, and the errors when the data is too small."""

import numpy as np
import pytest

from neox_progressive.errors import UserError
from neox_progressive.eval.examples import Documents, held_out

EOD = 0


def docs_of(lengths, seed=0):
    """Documents of the given lengths (without EOD), stored as NeoX's --append-eod writes them (EOD last)."""
    rng = np.random.default_rng(seed)
    raw = [rng.integers(1, 50, n) for n in lengths]
    stored = [np.concatenate([d, [EOD]]) for d in raw]
    return raw, Documents(len(stored), lambda i: stored[i], "test")


def test_kl_examples_are_documents_truncated_with_the_end_of_document_token_in_front():
    raw, docs = docs_of([3, 40, 7, 1, 25, 12, 60, 9])
    got = held_out(docs, 16, ppl=0, kl=8, kl_on="documents", prompts=0, prompt_tokens=4, seed=3, eod=EOD)
    assert sorted(got.kl_source) == list(range(8))                      # each document once
    for ex, i in zip(got.kl_examples, got.kl_source):
        want = [EOD] + raw[i].tolist()[:15]                             # EOD, then the document, 16 tokens at most
        assert ex.tolist() == want
    assert sorted(len(e) for e in got.kl_examples) == sorted(min(16, n + 1) for n in [3, 40, 7, 1, 25, 12, 60, 9])
    assert got.kl_source != list(range(8))                              # sampled, not file order
    again = held_out(docs, 16, ppl=0, kl=8, kl_on="documents", prompts=0, prompt_tokens=4, seed=3, eod=EOD)
    other = held_out(docs, 16, ppl=0, kl=8, kl_on="documents", prompts=0, prompt_tokens=4, seed=4, eod=EOD)
    assert again.kl_source == got.kl_source and other.kl_source != got.kl_source


def test_prompts_are_sampled_from_documents_long_enough():
    lengths = [3, 40, 7, 30, 25, 12, 60, 9, 50, 2]
    raw, docs = docs_of(lengths)
    got = held_out(docs, 64, ppl=0, kl=0, kl_on="documents", prompts=4, prompt_tokens=20, seed=1, eod=EOD)
    assert len(got.prompts) == 4 and len(set(got.prompt_source)) == 4
    assert all(lengths[i] + 1 >= 20 for i in got.prompt_source)         # only documents with 20 tokens or more
    for p, i in zip(got.prompts, got.prompt_source):
        assert p == [EOD] + raw[i].tolist()[:19]
    seeds = {tuple(held_out(docs, 64, ppl=0, kl=0, kl_on="documents", prompts=4, prompt_tokens=20, seed=s,
                            eod=EOD).prompt_source) for s in range(6)}
    assert len(seeds) > 1


def test_window_mode_and_perplexity_windows_follow_the_stream():
    raw, docs = docs_of([30, 41, 17, 25])
    stream = np.concatenate([np.concatenate([d, [EOD]]) for d in raw])
    got = held_out(docs, 16, ppl=3, kl=5, kl_on="windows", prompts=0, prompt_tokens=4, seed=0, eod=EOD)
    assert len(got.windows) == 5 and got.kl_source == list(range(5))
    for i, (w, ex) in enumerate(zip(got.windows, got.kl_examples)):
        assert w.tolist() == stream[16 * i:16 * i + 17].tolist()        # NeoX samples: seq + 1 tokens, stride seq
        assert ex.tolist() == w[:-1].tolist()


def test_without_an_end_of_document_id_documents_are_used_as_stored():
    raw, docs = docs_of([5, 9])
    got = held_out(docs, 8, ppl=0, kl=2, kl_on="documents", prompts=0, prompt_tokens=4, seed=0, eod=None)
    for ex, i in zip(got.kl_examples, got.kl_source):
        assert ex.tolist() == (raw[i].tolist() + [EOD])[:8]


@pytest.mark.parametrize("kw,words", [
    (dict(kl=9), "holds 8 documents of 2 tokens or more but 9 are needed"),
    (dict(prompts=3, prompt_tokens=14), "documents of 14 tokens or more but 3 are needed"),
    (dict(ppl=40), "windows of 17 tokens but 40 are needed"),
    (dict(prompts=1, prompt_tokens=20), "--prompt-tokens 20 is longer than the sequence length 16"),
    (dict(kl=1, kl_on="tokens"), "kl_on 'tokens': expected one of documents, windows"),
])
def test_too_little_data_is_a_user_error(kw, words):
    _, docs = docs_of([3, 40, 7, 1, 25, 12, 6, 9])
    args = dict(ppl=0, kl=0, kl_on="documents", prompts=0, prompt_tokens=4, seed=0, eod=EOD) | kw
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        held_out(docs, 16, **args)
