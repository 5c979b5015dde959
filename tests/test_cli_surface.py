"""The command line's surface: the flag set of every verb (frozen), help without torch, progress bars only on a
terminal, `--format json` summaries, flags generated from the option dataclasses."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neox_progressive.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# Every verb's flags. A change here is a change of the command line users script against: make it on purpose.
FLAGS = {
    "demo": "--debug --device --dry-run --family --force --format --help --out --quiet --seeds",
    "plan": "--debug --format --help --mode",
    "generate-configs": "--debug --dry-run --force --format --help --mode --no-plot --out",
    "prepare-data": "--debug --dry-run --eod-token --family --force --format --help --jsonl-key --mode --no-eod --out "
                    "--quiet --spm-model-type --stdlib-corpus --tokenizer --valid-fraction --valid-out --vocab-size",
    "run": "--debug --device --dry-run --engine --format --help --mode --neox-dir --neox-launcher-args --neox-python "
           "--no-eval --output-dir --quiet",
    "expand": "--aki-hidden --aki-second --allow-nonfinite --debug --depth-rule --dry-run --dst-config --force --format "
              "--gqa-layout --help --map-sampling --method --new-layer-init --out --quiet --rms-comp --seed --src "
              "--src-config --stage",
    "inspect": "--config --debug --format --help --quiet",
    "export-hf": "--allow-nonfinite --bos-id --config --debug --dry-run --dtype --eos-id --force --format --help "
                 "--no-tokenizer --out --quiet",
    "eval": "--batch-size --data --debug --device --draft-len --dry-run --dtype --example-tasks --force --format --help "
            "--include-path --kl-examples --kl-on --limit --member --modes --new-tokens --num-fewshot --out "
            "--ppl-windows --prompt-tokens --prompts --quiet --seed --seq-length --skip --tasks --temperature --text "
            "--write-example-tasks",
    "neox-patch": "--check --debug --dry-run --format --help --neox-dir --revert",
    "import-hf": "--allow-nonfinite --ckpt-format --config --debug --dry-run --dtype --force --format --help --out --quiet "
                 "--tp --write-config",
}
READ_ONLY = {"plan", "inspect"}  # verbs that write nothing, so need no --dry-run


def verbs() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return dict(sub.choices)


def flags(p) -> set[str]:
    return {o for a in p._actions for o in a.option_strings if o.startswith("--")}


def test_the_flag_set_of_every_verb_is_frozen():
    have = {verb: " ".join(sorted(flags(p))) for verb, p in verbs().items()}
    assert have == FLAGS


def test_every_verb_that_writes_has_dry_run_and_every_verb_a_json_format():
    for verb, p in verbs().items():
        assert verb in READ_ONLY or "--dry-run" in flags(p), verb
        fmt = next(a for a in p._actions if "--format" in a.option_strings)
        assert "json" in fmt.choices and fmt.default == "text", verb


def test_option_flags_come_from_the_dataclasses():
    """expand's and eval's option flags are the fields of ExpandOptions / EvalSettings, with the field docstrings."""
    from neox_progressive.cli_options import field_docs, flag_of
    from neox_progressive.eval.settings import EvalSettings
    from neox_progressive.expand.options import ExpandOptions

    for verb, cls in (("expand", ExpandOptions), ("eval", EvalSettings)):
        p, docs = verbs()[verb], field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = flag_of(f)
            if flag is None:
                continue
            action = next(a for a in p._actions if flag in a.option_strings)
            assert action.dest == f.name and docs[f.name].rstrip(".") in " ".join(action.help.split()), (verb, f.name)
            if f.default is not dataclasses.MISSING and not isinstance(f.default, tuple):
                assert action.default == f.default, (verb, f.name)
    args = build_parser().parse_args(["expand", "--src", "a", "--src-config", "b", "--dst-config", "c", "--out", "d",
                                      "--method", "fpi", "--seed", "7", "--gqa-layout", "general"])
    from neox_progressive.commands.expand import options_of

    assert options_of(args) == ExpandOptions(method="fpi", seed=7, gqa_layout="general")


PROBE = """
import contextlib, io, sys
from neox_progressive.cli import main
for argv in {cases!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit:
            pass
    assert out.getvalue().strip(), argv
print(sorted(m for m in ("torch", "deepspeed", "transformers", "lm_eval", "safetensors") if m in sys.modules))
"""


def test_help_and_version_do_not_import_torch():
    cases = [["--help"], ["--version"], *([verb, "--help"] for verb in FLAGS)]
    res = subprocess.run([sys.executable, "-c", PROBE.format(cases=cases)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty,env,quiet,drawn", [
    (True, None, False, True), (False, None, False, False), (True, "1", False, False), (True, "0", False, True),
    (True, None, True, False)])
def test_progress_bars_only_on_a_terminal_and_never_with_tqdm_disable(monkeypatch, tty, env, quiet, drawn):
    from neox_progressive.progress import progress_bar

    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    for _ in progress_bar(range(3), quiet=quiet, desc="work", mininterval=0):
        pass
    assert ("work" in stream.getvalue()) == drawn, stream.getvalue()


def test_a_verb_run_into_a_log_draws_no_bar(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "x": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "docs.jsonl").write_text('{"text": "x x"}\n' * 5)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    res = subprocess.run([sys.executable, "-m", "neox_progressive", "prepare-data", str(tmp_path / "docs.jsonl"),
                          "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "d")],
                         capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "tokenizing" not in res.stderr and "\r" not in res.stderr, res.stderr  # stderr is a pipe here


def test_plan_text_format_keeps_table_as_its_old_name(capsys):
    family = str(ROOT / "configs" / "neox" / "tiny_family.yml")
    outs = {}
    for fmt in ("text", "table", "json"):
        assert main(["plan", family, "--format", fmt]) == 0
        outs[fmt] = capsys.readouterr().out
    assert outs["text"] == outs["table"] and "family tiny" in outs["text"]
    assert json.loads(outs["json"])["family"] == "tiny"


def test_neox_dir_defaults_to_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NEOX_DIR", str(tmp_path / "neox"))
    assert main(["neox-patch", "--check"]) == 2
    assert f"{tmp_path / 'neox'} is not a GPT-NeoX checkout" in capsys.readouterr().err
    monkeypatch.delenv("NEOX_DIR")
    assert main(["neox-patch", "--check"]) == 2
    assert "pass --neox-dir DIR (its root, with deepy.py) or set NEOX_DIR" in capsys.readouterr().err
    monkeypatch.setenv("NEOX_DIR", str(tmp_path / "neox"))
    args = build_parser().parse_args(["run", "family.yml"])
    assert args.neox_dir == str(tmp_path / "neox")
