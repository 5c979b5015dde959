"""Validation perplexity: NeoX's sample windows, the cross entropy of a plain forward pass, NeoX mmap data."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import model_of, random_sd, tiny_shape

from neox_progressive.errors import UserError
from neox_progressive.eval.perplexity import mmap_documents, perplexity, token_windows

SHAPE = tiny_shape(num_kv_heads=2, padded_vocab_size=64)


def test_windows_are_neox_samples():
    """NeoX's GPT2Dataset: sample i = stream[i*seq : i*seq + seq + 1], documents concatenated in order."""
    docs = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 30)]
    stream = np.arange(30)
    got = list(token_windows(docs, 5))
    assert [w.tolist() for w in got] == [stream[i * 4: i * 4 + 5].tolist() for i in range(7)]
    assert len(list(token_windows(docs, 5, limit=3))) == 3
    with pytest.raises(UserError):
        list(token_windows(docs, 1))


def test_perplexity_is_the_cross_entropy_of_the_forward_pass():
    model = model_of(SHAPE, random_sd(SHAPE, seed=4, std=0.2))
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 64, (17,), generator=g).numpy() for _ in range(5)]
    res = perplexity(model, windows, batch_size=2, position_chunk=7)
    x = torch.as_tensor(np.stack(windows))
    with torch.no_grad():
        logits = model(x[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1)).item()
    assert res.loss == pytest.approx(want, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert (res.tokens, res.windows) == (5 * 16, 5)


def test_perplexity_refuses_tokens_outside_the_vocabulary():
    model = model_of(SHAPE, random_sd(SHAPE))
    with pytest.raises(UserError, match="another tokenizer"):
        perplexity(model, [np.array([1, 2, 99, 3])])


def test_reads_neox_mmap_data(tmp_path):
    from neox_progressive import data
    docs = [np.arange(1, 40) % 64, np.arange(5, 9), np.arange(3, 60) % 64]
    data.write_dataset(tmp_path / "valid", docs, vocab_size=64)
    got = list(mmap_documents(tmp_path / "valid"))
    assert [d.tolist() for d in got] == [d.tolist() for d in docs]
    assert [d.tolist() for d in mmap_documents(str(tmp_path / "valid") + ".bin")] == [d.tolist() for d in docs]


@pytest.mark.neox
def test_reads_data_written_by_neox_preprocess(tmp_path):
    """NeoX's own preprocess_data.py output: the windows hold the tokenizer's ids plus NeoX's end-of-document."""
    from eval_util import bpe_tokenizer_for_neox, neox_preprocess
    from neox_run import neox_dir
    from tokenizers import Tokenizer

    from neox_progressive.eval.tasks import stdlib_paragraphs

    tok = bpe_tokenizer_for_neox(tmp_path / "tok.json")
    texts = stdlib_paragraphs()[:20]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = neox_preprocess(neox_dir(), tmp_path / "d.jsonl", tok, tmp_path / "valid")
    t = Tokenizer.from_file(str(tok))
    want = [t.encode(x).ids + [t.token_to_id("<|endoftext|>")] for x in texts]
    assert [d.tolist() for d in mmap_documents(prefix)] == want
