"""The lm-eval model `neox-progressive` gives lm-eval's HFLM numbers on our HF export of the same checkpoint,
under the current lm-eval (this env) and 0.4.1 (NeoX's pin, in NeoX's virtualenv when NEOX_DIR is set)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_util import compare_with_hflm, require_lm_eval

require_lm_eval()
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (pip install accelerate)")

TESTS = Path(__file__).resolve().parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_process_group(environ) -> dict:
    """The environment without the torch.distributed variables an earlier in-process DeepSpeed test set: a child
    that inherits them (accelerate in lm-eval's HFLM) would start a process group on the port this process holds."""
    return {k: v for k, v in environ.items() if k not in DIST_VARS}


def check_same(out):
    ours, hf = out["tasks"]["ours"], out["tasks"]["hf"]
    assert set(ours) == set(hf) == {"stdlib_lastword", "stdlib_choice", "stdlib_rolling"}
    for task in ours:
        for metric, value in hf[task].items():
            if metric.endswith("_stderr") or metric == "sample_len":
                continue
            assert ours[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    r_ours, r_hf = out["requests"]["ours"], out["requests"]["hf"]
    for (lp, greedy), (lp_hf, greedy_hf) in zip(r_ours["loglikelihood"], r_hf["loglikelihood"], strict=True):
        assert lp == pytest.approx(lp_hf, rel=1e-4, abs=1e-4) and greedy == greedy_hf
    flags = [greedy for _, greedy in r_ours["loglikelihood"]]
    assert flags[-4:] == [True, False, False, True], flags   # the pairs built on eval_util.repeat_after_itself
    assert r_ours["rolling"] == pytest.approx(r_hf["rolling"], rel=1e-4)
    assert all(lp < 0 for lp, _ in r_ours["loglikelihood"])


def test_same_numbers_as_hflm_current_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    check_same(compare_with_hflm(tmp_path))


@pytest.mark.neox
@pytest.mark.slow
def test_same_numbers_as_hflm_lm_eval_0_4_1(tmp_path):
    from neox_run import neox_python

    py = neox_python()
    probe = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                           capture_output=True, text=True)
    if probe.returncode or not probe.stdout.startswith("0.4.1"):
        pytest.skip(f"NeoX's python {py} has no lm_eval 0.4.1 ({probe.stdout.strip() or probe.stderr[-200:]})")
    env = dict(without_process_group(os.environ), PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    code = ("import json, pathlib, eval_util; "
            f"print('RESULT' + json.dumps(eval_util.compare_with_hflm(pathlib.Path({str(tmp_path)!r}))))")
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    check_same(json.loads(line[len("RESULT"):]))
    assert sys.version_info >= (3, 10)


def test_generate_until_equals_transformers_greedy(tmp_path):
    import torch
    from eval_util import bpe_tokenizer, hf_export, hf_model, make_member
    from lm_eval.api.instance import Instance

    from neox_progressive.eval.lm import NeoXProgressiveLM

    member = make_member(tmp_path, "m", bpe_tokenizer(tmp_path / "tok.json"), std=0.08)
    hf = hf_model(hf_export(member, tmp_path / "hf"))
    tok = member.tokenizer
    contexts = ["Return a new", "Return the", "Create a new object", "The"]  # two share a length: one batch
    until = [".", "\n"]
    lm = NeoXProgressiveLM(checkpoint=str(member.checkpoint), config=str(member.configs[0]), batch_size=4)
    got = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                      arguments=(c, {"until": until, "max_gen_toks": 12})) for c in contexts])
    for context, text in zip(contexts, got, strict=True):
        ids = torch.tensor([tok.encode(context)])
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eod, pad_token_id=tok.eod)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eod]
        want = tok.decode(new)
        for u in until:
            want = want.split(u)[0]
        assert text == want
    assert any(len(t) > 3 for t in got)


def test_registered_by_name_for_lm_eval(tmp_path, monkeypatch):
    """`--model neox-progressive --model_args checkpoint=...,config=...` (lm-eval builds the model from the string) gives
    per document the log-likelihoods of the model built directly from the same weights and tokenizer."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from eval_util import bpe_tokenizer, make_member
    from lm_eval.api.registry import get_model

    from neox_progressive.eval.harness import TaskSet
    from neox_progressive.eval.lm import NeoXProgressiveLM
    from neox_progressive.eval.tasks import write_example_tasks
    from neox_progressive.model import Transformer

    assert get_model("neox-progressive") is NeoXProgressiveLM
    member = make_member(tmp_path, "m", bpe_tokenizer(tmp_path / "tok.json"))
    tasks = TaskSet([write_example_tasks(tmp_path / "tasks", n_docs=4)])
    manager = {"task_manager": tasks.manager} if tasks.manager else {}
    kwargs = dict(tasks=["stdlib_choice"], limit=4, bootstrap_iters=0, log_samples=True, **manager)
    by_name = tasks.lm_eval.evaluator.simple_evaluate(
        model="neox-progressive", model_args=f"checkpoint={member.checkpoint},config={member.configs[0]},batch_size=2",
        **kwargs)
    direct = tasks.lm_eval.evaluator.simple_evaluate(
        model=NeoXProgressiveLM(model=Transformer.from_state_dict(member.shape, member.reader.state_dict()),
                                tokenizer=member.tokenizer, batch_size=3),
        **kwargs)

    def per_doc(res):
        return [[float(r[0]) for r in s["filtered_resps"]] for s in res["samples"]["stdlib_choice"]]

    got, want = per_doc(by_name), per_doc(direct)
    assert len(got) == 4 and all(len(doc) == 4 for doc in got)           # four endings per document
    assert len({x for doc in want for x in doc}) == 16                    # real scores, not a constant
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5)
    assert by_name["results"]["stdlib_choice"]["acc,none"] == direct["results"]["stdlib_choice"]["acc,none"]


def test_plugin_imports_after_a_failed_bare_import_of_lm_eval(tmp_path):
    """Offline, lm_eval 0.4.1's own `import lm_eval` fails (its exact_match metric comes from the Hub) and leaves its
    registry half-built; the plugin's import path must still work in that process, and register the model.
    Under later lm-eval versions the bare import succeeds and the same code must work too."""
    from importlib.metadata import version

    code = ("try:\n    import lm_eval\n    print('bare import: ok')\n"
            "except Exception as exc:\n    print('bare import failed:', type(exc).__name__)\n"
            "from neox_progressive.eval.lm import NeoXProgressiveLM\n"
            "from lm_eval.api.registry import get_model\n"
            "assert get_model('neox-progressive') is NeoXProgressiveLM\n"
            "import lm_eval.api.metrics as m\n"
            "print('exact_match', m.exact_match_fn(references=['a b'], predictions=['a b'])['exact_match']"
            " if hasattr(m, 'exact_match_fn') else 'n/a')\n")
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if version("lm_eval") == "0.4.1":
        assert "bare import failed" in proc.stdout, proc.stdout   # the case this test is for
        assert "exact_match 1.0" in proc.stdout, proc.stdout       # served locally


def test_a_second_task_directory_with_the_same_names_replaces_the_first(tmp_path):
    """lm_eval 0.4.1 keeps the first registration of a task name process-wide; a second directory of the example
    tasks (each `eval` run writes them to a temporary directory that is deleted afterwards) must be the one read."""
    import shutil

    from neox_progressive.eval.harness import TaskSet
    from neox_progressive.eval.tasks import write_example_tasks

    first = write_example_tasks(tmp_path / "first", n_docs=3)
    TaskSet([first]).check(["stdlib_choice"])
    shutil.rmtree(first)
    second = TaskSet([write_example_tasks(tmp_path / "second", n_docs=5)])
    second.check(["stdlib_choice", "stdlib_lastword"])   # reads the datasets: the first directory is gone


def test_lm_eval_command_line_with_the_plugin_model(tmp_path):
    """`python -m neox_progressive.eval.lm_eval_cli --model neox-progressive ...` (lm-eval's own command line with the
    plugin's model) gives the numbers of lm-eval's `--model hf` on the HF export of the same member."""
    from eval_util import bpe_tokenizer, hf_export, make_member

    from neox_progressive.eval.tasks import write_example_tasks

    member = make_member(tmp_path, "m", bpe_tokenizer(tmp_path / "tokenizer.json"), std=0.08)
    hf_dir = hf_export(member, tmp_path / "hf")
    tasks = write_example_tasks(tmp_path / "tasks", n_docs=6)
    env = dict(without_process_group(os.environ), PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for name, entry, model_args in (
            ("ours", ["-m", "neox_progressive.eval.lm_eval_cli", "--model", "neox-progressive"],
             f"checkpoint={member.checkpoint},config={member.configs[0]}"),
            # lm-eval's HFLM through the same entry (plain `python -m lm_eval` cannot start offline under lm-eval 0.4.1)
            ("hf", ["-m", "neox_progressive.eval.lm_eval_cli", "--model", "hf"], f"pretrained={hf_dir},dtype=float32")):
        out = tmp_path / f"out_{name}"
        proc = subprocess.run([sys.executable, *entry, "--model_args", model_args, "--tasks", "stdlib_lastword,stdlib_choice",
                               "--include_path", str(tasks), "--limit", "6", "--device", "cpu", "--batch_size", "3",
                               "--output_path", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(next(out.rglob("results*.json")).read_text())["results"]
    for task in ("stdlib_lastword", "stdlib_choice"):
        assert results["ours"][task]["acc,none"] == pytest.approx(results["hf"][task]["acc,none"], abs=1e-9), task
