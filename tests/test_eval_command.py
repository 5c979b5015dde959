"""`neox-progressive eval` end to end on two tiny families: report files, the paper's tables, numbers that
agree with independent recomputations, dry run, and refusal to overwrite."""

import json

import pytest
import torch
import torch.nn.functional as F
from eval_util import bpe_tokenizer, make_member

from neox_progressive.cli import main
from neox_progressive.eval.tasks import stdlib_paragraphs
from neox_progressive.model import Transformer

LARGE = dict(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=6, ffn_size=64)
SEQ = 32


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    tok = bpe_tokenizer(root / "tok.json")
    members, specs = {}, []
    for fam, (s1, s2) in (("progressive", (1, 2)), ("independent", (3, 4))):
        small = make_member(root / fam, "S", tok, seed=s1, std=0.08)
        large = make_member(root / fam, "L", tok, seed=s2, std=0.08, **LARGE)
        members[fam] = (small, large)
        specs += [f"{fam}/S={small.checkpoint}:{small.configs[0]}", f"{fam}/L={large.checkpoint}:{large.configs[0]}"]
    text = root / "valid.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in stdlib_paragraphs()[300:360]))
    return root, members, specs, text


def eval_args(root, specs, text, *extra):
    args = ["eval", "--out", str(root / "out"), "--text", str(text), "--ppl-windows", "4", "--kl-examples", "3",
            "--prompts", "2", "--prompt-tokens", "8", "--new-tokens", "10", "--seq-length", str(SEQ), "--quiet"]
    for s in specs:
        args += ["--member", s]
    return args + list(extra)


def windows_by_hand(tok_path, text, n):
    """Independent windowing: encode each document + end-of-text, concatenate, NeoX samples of SEQ + 1 tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    stream = []
    for line in text.read_text().splitlines():
        stream += tok.encode(json.loads(line)["text"]).ids + [tok.token_to_id("<|endoftext|>")]
    return torch.tensor([stream[i * SEQ: i * SEQ + SEQ + 1] for i in range(n)])


@pytest.fixture(scope="module")
def report(family):
    root, _, specs, text = family
    assert main(eval_args(root, specs, text, "--example-tasks", "--limit", "3")) == 0
    return json.loads((root / "out" / "report.json").read_text())


def test_report_files_and_tables(family, report):
    root = family[0]
    out = root / "out"
    import importlib.util

    plots = ("perplexity.png", "kl.png", "acceptance.png") if importlib.util.find_spec("matplotlib") else ()
    for name in ("report.md", "report.json", *plots):  # the plots need matplotlib (the `plot` extra)
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "lm_eval").iterdir()) == [
        "independent_L.json", "independent_S.json", "progressive_L.json", "progressive_S.json"]
    md = (out / "report.md").read_text()
    for heading in ("Tables 1-3", "Table 4", "Table 5"):
        assert heading in md
    assert "| S → L |" in md and "independent/S | progressive/L | greedy" in md
    assert set(report["families"]) == {"progressive", "independent"}
    assert [c["draft"] + ">" + c["target"] for c in report["cross_pairs"]] == ["independent/S>progressive/L"]
    for fam in report["families"].values():
        assert [m["name"] for m in fam["members"]] == ["S", "L"]
        assert set(fam["members"][0]["tasks"]) == {"stdlib_lastword", "stdlib_choice", "stdlib_rolling"}
        (pair,) = fam["pairs"]
        assert pair["kl"]["kl"] > 0 and pair["kl"]["examples"] == 3
        assert pair["specdec"]["greedy"]["same_as_target"] is True
        assert set(pair["specdec"]) == {"greedy", "sampled"}


def kl_by_hand(ms, ml, x, vocab):
    """Per example [B, T]: mean over positions of KL both ways and of top-1 agreement, float64."""
    with torch.no_grad():
        lp = torch.log_softmax(ms(x)[..., :vocab].double(), -1)
        lq = torch.log_softmax(ml(x)[..., :vocab].double(), -1)
    return ((lp.exp() * (lp - lq)).sum(-1).mean(-1), (lq.exp() * (lq - lp)).sum(-1).mean(-1),
            (lp.argmax(-1) == lq.argmax(-1)).double().mean(-1))


def test_perplexity_and_kl_match_a_recomputation(family, report):
    """Perplexity on NeoX windows; KL on the documents the report names, each rebuilt by hand: end-of-text token, the
    text's tokens, truncated to SEQ tokens, one example alone (no padding)."""
    from tokenizers import Tokenizer

    root, members, _, text = family
    small, large = members["progressive"]
    x = windows_by_hand(root / "tok.json", text, 4)
    tok = Tokenizer.from_file(str(root / "tok.json"))
    eot = tok.token_to_id("<|endoftext|>")
    lines = text.read_text().splitlines()
    got = report["families"]["progressive"]
    kl = got["pairs"][0]["kl"]
    with torch.no_grad():
        ms = Transformer.from_state_dict(small.shape, small.reader.state_dict())
        ml = Transformer.from_state_dict(large.shape, large.reader.state_dict())
        logits = ms(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    vocab = small.tokenizer.vocab_size
    want = []
    for i in kl["per_example"]["source"]:
        doc = torch.tensor(([eot] + tok.encode(json.loads(lines[i])["text"]).ids)[:SEQ])[None]
        want.append([float(v[0]) for v in kl_by_hand(ms, ml, doc, vocab)] + [doc.shape[1]])
    assert got["members"][0]["perplexity"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["members"][0]["perplexity"]["tokens"] == 4 * SEQ
    assert kl["unit"] == "documents" and len(set(kl["per_example"]["source"])) == 3
    assert kl["per_example"]["kl"] == pytest.approx([w[0] for w in want], rel=1e-5)
    assert kl["per_example"]["reverse"] == pytest.approx([w[1] for w in want], rel=1e-5)
    assert kl["per_example"]["top1"] == pytest.approx([w[2] for w in want], abs=1e-12)
    assert kl["per_example"]["positions"] == [w[3] for w in want]
    assert kl["kl"] == pytest.approx(sum(w[0] for w in want) / 3, rel=1e-5)
    assert kl["reverse"]["kl"] == pytest.approx(sum(w[1] for w in want) / 3, rel=1e-5)
    assert kl["distribution"]["max"] == pytest.approx(max(w[0] for w in want), rel=1e-5)


def test_kl_on_windows_matches_a_recomputation(family, tmp_path):
    root, members, specs, text = family
    out = tmp_path / "w"
    args = ["eval", "--out", str(out), "--text", str(text), "--kl-examples", "3", "--kl-on", "windows",
            "--seq-length", str(SEQ), "--skip", "ppl,specdec", "--quiet", "--member", specs[0], "--member", specs[1]]
    assert main(args) == 0
    kl = json.loads((out / "report.json").read_text())["families"]["progressive"]["pairs"][0]["kl"]
    small, large = members["progressive"]
    ms = Transformer.from_state_dict(small.shape, small.reader.state_dict())
    ml = Transformer.from_state_dict(large.shape, large.reader.state_dict())
    fwd, rev, top = kl_by_hand(ms, ml, windows_by_hand(root / "tok.json", text, 3)[:, :-1], small.tokenizer.vocab_size)
    assert kl["unit"] == "windows" and kl["per_example"]["source"] == [0, 1, 2]
    assert kl["kl"] == pytest.approx(float(fwd.mean()), rel=1e-5)
    assert kl["reverse"]["kl"] == pytest.approx(float(rev.mean()), rel=1e-5)
    assert kl["top1_agreement"] == pytest.approx(float(top.mean()), abs=1e-12)
    assert "the first 3 windows of 32 tokens" in (out / "report.md").read_text()


def test_dry_run_and_refusing_to_overwrite(family, report, capsys):
    root, _, specs, text = family
    assert main(eval_args(root, specs, text, "--dry-run", "--skip", "specdec")) == 0
    out = capsys.readouterr().out
    assert "pair independent/S -> progressive/L (cross-family)" in out and "steps: ppl, kl;" in out
    assert main(eval_args(root, specs, text, "--dry-run", "--skip", "specdec", "--format", "json")) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == ["ppl", "kl"] and {"draft": "independent/S", "target": "progressive/L",
                                               "cross_family": True} in plan["pairs"]
    assert sorted(plan["families"]) == ["independent", "progressive"]
    assert main(eval_args(root, specs, text, "--skip", "kl,specdec")) == 2
    assert "already exists" in capsys.readouterr().err


def test_neox_mmap_data_gives_the_same_numbers_as_the_text(family, report, tmp_path):
    from tokenizers import Tokenizer

    from neox_progressive import data

    root, members, specs, text = family
    tok = Tokenizer.from_file(str(root / "tok.json"))
    eod = tok.token_to_id("<|endoftext|>")
    docs = [tok.encode(json.loads(line)["text"]).ids + [eod] for line in text.read_text().splitlines()]
    data.write_dataset(tmp_path / "valid_text_document", docs, vocab_size=tok.get_vocab_size())
    out = tmp_path / "out"
    args = ["eval", "--out", str(out), "--data", str(tmp_path / "valid_text_document"), "--ppl-windows", "4",
            "--kl-examples", "3", "--seq-length", str(SEQ), "--skip", "specdec", "--quiet", "--member", specs[0],
            "--member", specs[1]]
    assert main(args) == 0
    got = json.loads((out / "report.json").read_text())["families"]["progressive"]
    want = report["families"]["progressive"]
    assert got["members"][1]["perplexity"] == pytest.approx(want["members"][1]["perplexity"], rel=1e-6)
    assert got["pairs"][0]["kl"]["kl"] == pytest.approx(want["pairs"][0]["kl"]["kl"], rel=1e-6)
    assert got["pairs"][0]["kl"]["per_example"]["source"] == want["pairs"][0]["kl"]["per_example"]["source"]


def test_help_and_example_tasks(tmp_path, capsys):
    for verb, words in (("eval", ["KL(p_small || p_large)", "our", "reading", "KL(p_large || p_small)", "--kl-on", "--member",
                                  "--example-tasks", "examples:", "mean accepted length"]),
                        ("neox-patch", ["ea7aefd8", "--check", "--revert", "eval_hook"])):
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), (verb, out)
    assert main(["eval", "--write-example-tasks", str(tmp_path / "t")]) == 0
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    tasks = ("stdlib_choice", "stdlib_lastword", "stdlib_rolling")
    assert names == sorted(f"{t}.{ext}" for t in tasks for ext in ("jsonl", "yaml"))
