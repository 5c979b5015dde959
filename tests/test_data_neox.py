"""Our mmap datasets against real GPT-NeoX (NEOX_DIR): NeoX's preprocess_data.py output is read by
our reader and equals what prepare-data writes byte for byte; NeoX's MMapIndexedDataset reads ours."""

import json
import subprocess

import pytest
from neox_run import neox_dir, neox_python
from train_util import make_data

from neox_progressive.cli import main
from neox_progressive.data import MMapDataset, cut_windows
from neox_progressive.tokenizer import file_tokenizer

pytestmark = pytest.mark.neox


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the of and to a in is that for it as with was on be by this".split()
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words), "<|endoftext|>": len(words) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("neoxdata"), n_chars=30_000)


def run_preprocess(jsonl, tokenizer_type, vocab, out):
    cmd = [neox_python(), "tools/datasets/preprocess_data.py", "--input", str(jsonl), "--tokenizer-type", tokenizer_type,
           "--vocab-file", str(vocab), "--append-eod", "--output-prefix", str(out)]
    proc = subprocess.run(cmd, cwd=neox_dir(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return f"{out}_text_document"


@pytest.mark.parametrize("kind", ["spm", "hf"])
def test_neox_preprocess_equals_prepare_data(tmp_path, data, kind):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in data["docs"][:60]))
    if kind == "spm":
        ttype, vocab = "SPMTokenizer", data["tokenizer"]
    else:
        ttype, vocab = "HFTokenizer", tmp_path / "tokenizer.json"
        word_tokenizer(vocab)
    neox_prefix = run_preprocess(jsonl, ttype, vocab, tmp_path / "neox")
    assert main(["prepare-data", str(jsonl), "--tokenizer", str(vocab), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"neox_text_document{suffix}").read_bytes()
    # and our reader sees NeoX's documents: tokens of each text, then the EOD id
    ds, tok = MMapDataset(neox_prefix), file_tokenizer(vocab)
    want = [ids + [tok.eod] for ids in tok.encode_batch(data["docs"][:60])]
    assert [ds[i].tolist() for i in range(len(ds))] == want


def test_neox_reads_our_dataset(tmp_path, data):
    cut = cut_windows(data["train"], [[100, 700], [5, 50]], tmp_path / "win")
    script = (
        "import sys, json; sys.path.insert(0, '.')\n"
        "from megatron.data.indexed_dataset import MMapIndexedDataset\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    ds = MMapIndexedDataset(p, skip_warmup=True)\n"
        "    out[p] = {'items': [ds[i].tolist() for i in range(len(ds))], 'doc_idx': ds.doc_idx.tolist(),\n"
        "              'dtype': str(ds._index.dtype.__name__)}\n"
        "print('JSON' + json.dumps(out))\n"
    )
    proc = subprocess.run([neox_python(), "-c", script, data["train"], cut.prefix], cwd=neox_dir(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("JSON", 1)[1])
    for prefix in (data["train"], cut.prefix):
        ours = MMapDataset(prefix)
        assert got[prefix]["items"] == [ours[i].tolist() for i in range(len(ours))]
        assert got[prefix]["doc_idx"] == ours.doc_idx.tolist()
        assert got[prefix]["dtype"] == "uint16"
    assert sum(map(len, got[cut.prefix]["items"])) == 600 + 45
