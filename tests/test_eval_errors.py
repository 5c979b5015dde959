"""Bad inputs to evaluation end in one clear line: what, where, and the fix."""

import json

import pytest
import yaml
from eval_util import bpe_tokenizer, make_member

from neox_progressive.cli import main
from neox_progressive.errors import UserError
from neox_progressive.eval.member import TrainedMember, check_same_vocabulary
from neox_progressive.eval.tasks import stdlib_paragraphs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    tok_a = bpe_tokenizer(root / "a.json", vocab_size=300)
    tok_b = bpe_tokenizer(root / "b.json", vocab_size=290)  # pads to the same 320 rows: only the tokenizer differs
    a = make_member(root, "A", tok_a)
    b = make_member(root, "B", tok_b, seed=1)
    text = root / "valid.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in stdlib_paragraphs()[:40]))
    return root, a, b, text


def spec(m):
    return f"{m.name}={m.checkpoint}:{m.configs[0]}"


def run(capsys, *args):
    code = main(["eval", *args])
    return code, capsys.readouterr().err.strip()


def test_members_with_different_tokenizers_are_refused(setup, capsys):
    root, a, b, text = setup
    assert a.shape.padded_vocab_size == b.shape.padded_vocab_size
    with pytest.raises(UserError, match="different tokenizers"):
        check_same_vocabulary(a, b)
    code, err = run(capsys, "--out", str(root / "o1"), "--text", str(text), "--member", spec(a), "--member", spec(b))
    assert code == 2 and "members family/A and family/B use different tokenizers" in err
    assert not (root / "o1").exists()


def test_members_naming_different_tokenizer_files_without_the_files(setup, tmp_path):
    _, a, _, _ = setup
    cfgs = []
    for name, vocab in (("x", "gone/x.json"), ("y", "gone/y.json")):
        cfg = yaml.safe_load(a.configs[0].read_text()) | {"vocab_file": vocab}
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        cfgs.append(tmp_path / f"{name}.yml")
    x = TrainedMember("x", a.checkpoint, [cfgs[0]])
    y = TrainedMember("y", a.checkpoint, [cfgs[1]])
    with pytest.raises(UserError, match="name different tokenizers"):
        check_same_vocabulary(x, y)


def test_missing_checkpoint(setup, capsys):
    root, a, _, text = setup
    code, err = run(capsys, "--out", str(root / "o2"), "--text", str(text), "--member", f"A=/nowhere/ck:{a.configs[0]}")
    assert code == 2 and "checkpoint '/nowhere/ck' does not exist" in err and "member family/A" in err


def test_missing_config_and_bad_member_spec(setup, capsys):
    root, a, _, text = setup
    code, err = run(capsys, "--out", str(root / "o3"), "--text", str(text), "--member", f"A={a.checkpoint}:/no/cfg.yml")
    assert code == 2 and "config file '/no/cfg.yml' does not exist" in err
    code, err = run(capsys, "--out", str(root / "o3"), "--member", "just-a-path")
    assert code == 2 and "expected [FAMILY/]NAME=CHECKPOINT_DIR:CONFIG.yml" in err


def test_task_not_available_offline(setup, capsys, tmp_path, monkeypatch):
    root, a, _, text = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache", raising=False)
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump({
        "task": "needs_remote_data", "dataset_path": "neox-progressive-tests/no-such-dataset", "test_split": "test",
        "output_type": "loglikelihood", "doc_to_text": "{{a}}", "doc_to_target": "{{b}}",
        "metric_list": [{"metric": "acc"}], "metadata": {"version": 1.0}}))
    code, err = run(capsys, "--out", str(root / "o4"), "--text", str(text), "--member", spec(a), "--skip", "ppl",
                    "--include-path", str(tmp_path), "--tasks", "needs_remote_data")
    assert code == 2
    assert "task 'needs_remote_data' could not load neox-progressive-tests/no-such-dataset" in err
    assert "HF_DATASETS_OFFLINE=1" in err and "--include-path" in err
    # the hint names the HF cache this machine reads ($HF_HOME) and the folder `datasets` itself looks in
    assert f"into {tmp_path / 'hf_home'} here" in err and f"reads: {tmp_path / 'datasets_cache'})" in err


def test_unknown_task_gets_a_suggestion(setup, capsys, tmp_path):
    from neox_progressive.eval.tasks import write_example_tasks

    root, a, _, text = setup
    code, err = run(capsys, "--out", str(root / "o5"), "--text", str(text), "--member", spec(a),
                    "--include-path", str(write_example_tasks(tmp_path, n_docs=4)), "--tasks", "stdlib_lastwrd")
    assert code == 2 and "lm-eval task 'stdlib_lastwrd' is not known" in err and "did you mean stdlib_lastword" in err


def test_data_too_short_and_no_data(setup, capsys, tmp_path):
    root, a, _, _ = setup
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short."}) + "\n")
    code, err = run(capsys, "--out", str(root / "o6"), "--text", str(short), "--member", spec(a))
    assert code == 2 and "windows of" in err and "are needed" in err
    code, err = run(capsys, "--out", str(root / "o6"), "--member", spec(a))
    assert code == 2 and "exactly one of --data" in err
    code, err = run(capsys, "--out", str(root / "o6"), "--data", str(tmp_path / "valid_text_document"), "--member", spec(a))
    assert code == 2 and "valid_text_document" in err


def test_tokenizer_file_missing_for_tasks(setup, tmp_path):
    _, a, _, _ = setup
    cfg = yaml.safe_load(a.configs[0].read_text()) | {"vocab_file": str(tmp_path / "missing.json")}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="does not exist on this machine"):
        TrainedMember("A", a.checkpoint, [tmp_path / "c.yml"]).tokenizer  # noqa: B018
