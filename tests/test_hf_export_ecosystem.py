"""The export as written (weights + the member's tokenizer, nothing added by hand) works where users take it:
`lm_eval.simple_evaluate(model="hf", model_args="pretrained=EXPORT")` gives our lm-eval model's numbers on the
NeoX checkpoint, and transformers' assisted generation with the smaller member's export as `assistant_model`
gives the target's greedy output (and our reference model's), prompts encoded by the export's AutoTokenizer.
Under the current transformers / lm-eval here, and under transformers 4.38 / lm-eval 0.4.1 in NeoX's
virtualenv when NEOX_DIR is set."""

import json
import os
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def check_lm_eval(out):
    hf, ours = out["hf"], out["ours"]
    assert set(hf) == set(ours) == {"stdlib_lastword", "stdlib_choice", "stdlib_rolling"}
    for task, metrics in hf.items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr") and metric != "sample_len":
                assert ours[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert hf["stdlib_rolling"]["byte_perplexity"] > 1  # a real number was computed


def check_assisted(out):
    assert out["eos"] is not None
    assert out["assisted"] == out["greedy"] == out["ours"]
    assert all(len(t) > 3 for t in out["assisted"]) and all(isinstance(s, str) for s in out["decoded"])


def test_lm_eval_simple_evaluate_hf_on_the_export(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:  # not importorskip: lm_eval 0.4.1 offline imports only via import_lm_eval
        pytest.skip("lm-eval is not installed")
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate")
    from hf_export_util import lm_eval_vs_ours

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    check_lm_eval(lm_eval_vs_ours(tmp_path))


def test_assisted_generation_with_the_smaller_members_export(tmp_path):
    pytest.importorskip("transformers")
    from hf_export_util import assisted_vs_greedy

    check_assisted(assisted_vs_greedy(tmp_path))


@pytest.mark.neox
@pytest.mark.slow
def test_transformers_4_38_and_lm_eval_0_4_1(tmp_path):
    from neox_run import neox_python

    py = neox_python()
    probe = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('transformers'), m.version('lm_eval'))"],
                           capture_output=True, text=True)
    if probe.returncode or probe.stdout.split() != ["4.38.0", "0.4.1"]:
        pytest.skip(f"NeoX's python {py} has not transformers 4.38.0 / lm_eval 0.4.1 "
                    f"({probe.stdout.strip() or probe.stderr[-200:]})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    code = ("import json, pathlib, hf_export_util as u; "
            f"root = pathlib.Path({str(tmp_path)!r}); "
            "print('RESULT' + json.dumps({'assisted': u.assisted_vs_greedy(root / 'a'), "
            "'lm_eval': u.lm_eval_vs_ours(root / 'l')}))")
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    check_assisted(result["assisted"])
    check_lm_eval(result["lm_eval"])
