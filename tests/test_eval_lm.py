"""The lm-eval model `neox-progressive` gives lm-eval's HFLM numbers on our HF export of the same checkpoint,
under the current lm-eval (this env) and 0.4.1 (NeoX's pin, in NeoX's virtualenv when NEOX_DIR is set)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (pip install accelerate)")
from eval_util import compare_with_hflm  # noqa: E402

TESTS = Path(__file__).resolve().parent


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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
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
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eot_id]
        want = tok.decode(new)
        for u in until:
            want = want.split(u)[0]
        assert text == want
    assert any(len(t) > 3 for t in got)


def test_registered_by_name_for_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from eval_util import bpe_tokenizer, make_member
    from lm_eval.api.registry import get_model

    from neox_progressive.eval.harness import TaskSet
    from neox_progressive.eval.lm import NeoXProgressiveLM
    from neox_progressive.eval.tasks import write_example_tasks

    assert get_model("neox-progressive") is NeoXProgressiveLM
    member = make_member(tmp_path, "m", bpe_tokenizer(tmp_path / "tok.json"))
    tasks = TaskSet([write_example_tasks(tmp_path / "tasks", n_docs=3)])
    res = tasks.lm_eval.evaluator.simple_evaluate(
        model="neox-progressive", model_args=f"checkpoint={member.checkpoint},config={member.configs[0]},batch_size=2",
        tasks=["stdlib_choice"], limit=3, bootstrap_iters=0, **({"task_manager": tasks.manager} if tasks.manager else {}))
    assert 0 <= res["results"]["stdlib_choice"]["acc,none"] <= 1
