"""export-hf writes the member's tokenizer: `AutoTokenizer.from_pretrained(export)` gives NeoX's ids.

NeoX encodes with `SentencePieceProcessor.encode` (SPMTokenizer), `tokenizers.Tokenizer.encode(text).ids`
(HFTokenizer) and transformers' GPT2Tokenizer on vocab.json + merges.txt (GPT2BPETokenizer). Here the export's
AutoTokenizer is compared with those libraries called directly, with the plugin's own NeoX-equivalent tokenizer
(tokenizer.py), and (NEOX_DIR) with NeoX's own tokenizer classes under transformers 4.38 in NeoX's
virtualenv. Tokenizers are trained here on standard-library docstrings (no downloads)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hf_export_util import EOT, export, gpt2_files, member, spm_raw, spm_tokenizer, texts

from neox_progressive.cli import main
from neox_progressive.eval.tasks import stdlib_paragraphs
from neox_progressive.spm_json import read_spm, spm_tokenizer_json
from neox_progressive.tokenizer import config_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TESTS = Path(__file__).resolve().parent
KINDS = ("spm_bpe", "spm_unigram", "hf", "gpt2")


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    from eval_util import bpe_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    vocab, merges = gpt2_files(root / "gpt2")
    return {
        "spm_bpe": {"tokenizer_type": "SPMTokenizer", "vocab_file": str(spm_tokenizer(root / "bpe.model"))},
        "spm_unigram": {"tokenizer_type": "SPMTokenizer", "vocab_file": str(spm_tokenizer(root / "uni.model", "unigram"))},
        "hf": {"tokenizer_type": "HFTokenizer", "vocab_file": str(bpe_tokenizer(root / "tokenizer.json"))},
        "gpt2": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab), "merge_file": str(merges)},
    }


@pytest.fixture(scope="module")
def exports(tok_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {kind: export(*member(root / kind, "m", cfg), root / kind / "hf") for kind, cfg in tok_files.items()}


def reference(kind: str, cfg: dict):
    """NeoX's encode for the config, through the libraries NeoX itself calls."""
    if kind.startswith("spm"):
        sp = sentencepiece.SentencePieceProcessor(model_file=cfg["vocab_file"])
        return sp.encode, sp.decode
    if kind == "hf":
        tok = tokenizers.Tokenizer.from_file(cfg["vocab_file"])
        return (lambda s: tok.encode(s).ids), (lambda ids: tok.decode(ids, skip_special_tokens=False))
    tok = transformers.GPT2Tokenizer(cfg["vocab_file"], cfg["merge_file"], errors="replace",
                                     clean_up_tokenization_spaces=False)  # NeoX decodes bytes as they are (4.38 cleans)
    return tok.encode, tok.decode


@pytest.mark.parametrize("kind", KINDS)
def test_autotokenizer_of_the_export_gives_neox_ids(tok_files, exports, kind):
    cfg, out = tok_files[kind], exports[kind]
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    encode, decode = reference(kind, cfg)
    ours = config_tokenizer(cfg)  # the plugin's NeoX-equivalent tokenizer (evaluation, data)
    for text in texts() + ["reserved pieces spelled out: <unk> <s> </s> <0x41> <|padding|>"]:
        ids = auto(text).input_ids
        assert ids == auto.encode(text) == encode(text) == ours.encode(text), (kind, text[:60])
        assert auto.decode(ids) == decode(ids), (kind, text[:60])
    eot = ours.eod
    assert eot is not None and auto.convert_ids_to_tokens(eot) == EOT
    assert (auto.eos_token_id, auto.bos_token_id) == (eot, eot) and auto.pad_token_id is not None
    for name in ("config.json", "generation_config.json"):
        cfg_json = json.loads((out / name).read_text())
        assert (cfg_json["eos_token_id"], cfg_json["bos_token_id"], cfg_json["pad_token_id"]) == \
            (eot, eot, auto.pad_token_id), name


SPM_MODELS = {  # SentencePiece models NeoX users have, trained here
    "plugin bpe": lambda p: spm_tokenizer(p),
    "plugin unigram": lambda p: spm_tokenizer(p, "unigram"),
    "library defaults bpe (nmt_nfkc, extra spaces removed)": lambda p: spm_raw(p, model_type="bpe"),
    "library defaults unigram": lambda p: spm_raw(p, model_type="unigram"),
    "llama-like (identity, byte fallback, rare characters unknown)": lambda p: spm_raw(
        p, model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        character_coverage=0.99),
    "user-defined symbols, nmt_nfkc, no dummy prefix": lambda p: spm_raw(
        p, model_type="bpe", user_defined_symbols=["<br>", "\n"], add_dummy_prefix=False, remove_extra_whitespaces=False,
        byte_fallback=True),
}


@pytest.mark.parametrize("name", list(SPM_MODELS))
def test_converted_sentencepiece_gives_sentencepiece_ids_on_every_stdlib_paragraph(tmp_path, name):
    path = SPM_MODELS[name](tmp_path / "m.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = tokenizers.Tokenizer.from_str(spm_tokenizer_json(read_spm(path.read_bytes()), []))
    paras = stdlib_paragraphs()
    cases = paras + texts() + ["\n\n".join(paras), "a<br>b", "<br>", "x<br>"]
    for text in cases:
        assert tok.encode(text).ids == sp.encode(text), (name, text[:80])
        assert tok.decode(sp.encode(text), skip_special_tokens=False) == sp.decode(sp.encode(text)) or "<unk>" in \
            [sp.id_to_piece(i) for i in sp.encode(text)], (name, text[:80])


def test_the_documented_differences(tmp_path):
    """Where an HF tokenizer cannot give SentencePiece's ids (spm_json.py), the difference is exactly the one described."""
    path = spm_tokenizer(tmp_path / "bpe.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    eod = sp.piece_to_id(EOT)
    tok = tokenizers.Tokenizer.from_str(spm_tokenizer_json(read_spm(path.read_bytes()), [eod]))
    # the literal spelling of a special token of the export: SentencePiece spells it out, HF gives the token (and
    # the text after it gets the dummy prefix again)
    assert tok.encode(f"a{EOT}b").ids == sp.encode("a") + [eod] + sp.encode("b") != sp.encode(f"a{EOT}b")
    # a multi-character user-defined symbol with the dummy prefix: the prefix comes again after the symbol
    path = spm_raw(tmp_path / "u.model", model_type="bpe", user_defined_symbols=["<br>"], normalization_rule_name="identity")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = tokenizers.Tokenizer.from_str(spm_tokenizer_json(read_spm(path.read_bytes()), []))
    br = sp.piece_to_id("<br>")
    assert tok.encode("alpha<br>beta").ids == sp.encode("alpha") + [br] + sp.encode("beta") != sp.encode("alpha<br>beta")
    assert tok.encode("alpha<br>").ids == sp.encode("alpha<br>")  # the same when nothing follows
    # with remove_extra_whitespaces (the library's default), spaces next to such a symbol are dropped too
    path = spm_raw(tmp_path / "w.model", model_type="bpe", user_defined_symbols=["<br>"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = tokenizers.Tokenizer.from_str(spm_tokenizer_json(read_spm(path.read_bytes()), []))
    br = sp.piece_to_id("<br>")
    assert tok.encode("alpha <br> beta").ids == sp.encode("alpha") + [br] + sp.encode("beta") != sp.encode("alpha <br> beta")
    assert tok.encode("alpha<br>").ids == sp.encode("alpha<br>")


def test_model_reader_equals_protobuf(tmp_path):
    """The wire-format reader against protobuf's own parser of sentencepiece_model.proto."""
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    for i, make in enumerate(SPM_MODELS.values()):
        data = make(tmp_path / f"{i}.model").read_bytes()
        ours, theirs = read_spm(data), pb.ModelProto.FromString(data)
        assert ours.pieces == [(p.piece, pytest.approx(p.score), p.type) for p in theirs.pieces]
        t, n = theirs.trainer_spec, theirs.normalizer_spec
        assert (ours.model_type, ours.byte_fallback, ours.treat_whitespace_as_suffix, ours.unk_surface, ours.eos_piece) == \
            (t.model_type, t.byte_fallback, t.treat_whitespace_as_suffix, t.unk_surface, t.eos_piece)
        assert (ours.normalizer, ours.charsmap, ours.add_dummy_prefix, ours.remove_extra_whitespaces,
                ours.escape_whitespaces) == (n.name, n.precompiled_charsmap, n.add_dummy_prefix, n.remove_extra_whitespaces,
                                             n.escape_whitespaces)


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, tok_files, capsys):
    ck, yml = member(tmp_path, "m", tok_files["spm_bpe"])
    out = tmp_path / "hf"
    assert main(["export-hf", str(ck), "--config", str(yml), "--out", str(out), "--dry-run", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["tokenizer"] == "SPMTokenizer" and plan["architecture"] == "LlamaForCausalLM"
    assert plan["eos_token_id"] == config_tokenizer(yaml.safe_load(yml.read_text())).eod
    assert not out.exists()
    cfg = {**yaml.safe_load(yml.read_text()), "vocab_file": str(tmp_path / "gone.model")}
    yml.write_text(yaml.safe_dump(cfg))
    assert main(["export-hf", str(ck), "--config", str(yml), "--out", str(out), "--dry-run"]) == 2  # the same checks
    assert "gone.model" in capsys.readouterr().err and not out.exists()


def _run(args, capsys):
    code = main(["export-hf", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_bad_tokenizer_inputs_give_one_line_errors_and_write_nothing(tmp_path, tok_files, capsys):
    ck, yml = member(tmp_path, "m", tok_files["spm_bpe"])
    cfg = yaml.safe_load(yml.read_text())
    cases = {
        "no_vocab_file": ({k: v for k, v in cfg.items() if k != "vocab_file"}, [], "config key vocab_file is not set"),
        "missing_file": ({**cfg, "vocab_file": str(tmp_path / "gone.model")}, [], "gone.model"),
        "tiktoken": ({**cfg, "tokenizer_type": "TiktokenTokenizer"}, [], "tokenizer_type TiktokenTokenizer"),
        "eos_id": (cfg, ["--eos-id", "100000"], "--eos-id 100000"),
    }
    for name, (c, extra, msg) in cases.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(c))
        code, err = _run([ck, "--config", path, "--out", tmp_path / name, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and "\n" not in err and msg in err, (name, err)
        assert not (tmp_path / name).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]
    with pytest.raises(Exception, match="has 400 tokens but the checkpoint's embedding only 64 rows"):
        from neox_progressive.hf_tokenizer import export_tokenizer
        export_tokenizer(cfg, None, 64)


def test_no_tokenizer_and_explicit_ids(tmp_path, tok_files, capsys):
    ck, yml = member(tmp_path, "m", tok_files["spm_bpe"])
    code, _ = _run([ck, "--config", yml, "--out", tmp_path / "bare", "--no-tokenizer"], capsys)
    assert code == 0 and not (tmp_path / "bare" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["eos_token_id"] is None
    code, _ = _run([ck, "--config", yml, "--out", tmp_path / "ids", "--bos-id", "2", "--eos-id", "1"], capsys)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ids"))
    assert code == 0 and (auto.bos_token_id, auto.eos_token_id) == (2, 1)
    gen = json.loads((tmp_path / "ids" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (2, 1)


NEOX_PROBE = r"""
import importlib.util, json, sys
from transformers import AutoTokenizer
spec = importlib.util.spec_from_file_location("neox_tokenizer", sys.argv[1] + "/megatron/tokenizer/tokenizer.py")
neox = importlib.util.module_from_spec(spec)
spec.loader.exec_module(neox)
cases, texts = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for kind, (cfg, export) in cases.items():
    if cfg["tokenizer_type"] == "SPMTokenizer":
        tok = neox.SentencePieceTokenizer(cfg["vocab_file"])
    elif cfg["tokenizer_type"] == "HFTokenizer":
        tok = neox.HFTokenizer(cfg["vocab_file"])
    else:
        tok = neox._GPT2BPETokenizer(cfg["vocab_file"], cfg["merge_file"])
    auto = AutoTokenizer.from_pretrained(export)
    out[kind] = {"neox": [list(tok.tokenize(t)) for t in texts], "auto": [auto(t).input_ids for t in texts],
                 "eod": tok.eod, "eos": auto.eos_token_id}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.neox
def test_neox_tokenizer_classes_and_transformers_4_38_give_the_same_ids(tmp_path, tok_files, exports):
    """NeoX's own SentencePieceTokenizer / HFTokenizer / _GPT2BPETokenizer (megatron/tokenizer/tokenizer.py) in NeoX's
    virtualenv (transformers 4.38, tokenizers 0.15) against AutoTokenizer on the exports made here, in both envs."""
    from eval_util import bpe_tokenizer_for_neox
    from neox_run import neox_dir, neox_python

    cases = {k: (tok_files[k], str(exports[k])) for k in ("spm_bpe", "spm_unigram", "gpt2")}
    # NeoX's pinned tokenizers cannot read the JSON newer ones write: the HF tokenizer is trained by NeoX's python
    hf_cfg = {"tokenizer_type": "HFTokenizer", "vocab_file": str(bpe_tokenizer_for_neox(tmp_path / "tokenizer.json"))}
    cases["hf"] = (hf_cfg, str(export(*member(tmp_path / "hf", "m", hf_cfg), tmp_path / "hf" / "hf")))
    sample = texts()
    env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([neox_python(), "-c", NEOX_PROBE, str(neox_dir()), json.dumps(cases), json.dumps(sample)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    for kind, (_, out) in cases.items():
        r = result[kind]
        current = transformers.AutoTokenizer.from_pretrained(out)
        assert r["neox"] == r["auto"] == [current(t).input_ids for t in sample], kind
        assert r["eod"] == r["eos"] == current.eos_token_id, kind
