"""report.md / report.json / plots from a results dict (the paper's Tables 1, 4 and 5 side by side)."""

import json
import sys

import pytest

from neox_progressive.eval.report import write_report


def member(name, params, ppl, acc):
    return {"name": name, "params": params, "perplexity": {"loss": 2.0, "perplexity": ppl},
            "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.01}}}


def pair(small, large, kl, acc):
    return {"small": small, "large": large, "kl": {"kl": kl},
            "specdec": {"greedy": {"acceptance_rate": acc, "seconds_per_prompt": 7.0, "target_seconds_per_prompt": 8.0,
                                   "speedup": 8 / 7}}}


RESULTS = {
    "settings": {"draft_len": 8, "device": "cpu"},
    "families": {
        "progressive": {"members": [member("4B", 4_000_000_000, 8.72, 0.774), member("8B", 8_000_000_000, 7.64, 0.783)],
                        "pairs": [pair("4B", "8B", 0.3378, 0.932)]},
        "independent": {"members": [member("4B", 4_100_000_000, 9.18, 0.767), member("8B", 8_100_000_000, 7.85, 0.770)],
                        "pairs": [pair("4B", "8B", 0.4584, 0.90)]},
    },
    "cross_pairs": [dict(pair("4B", "8B", 0.4281, 0.872), draft="independent/4B", target="progressive/8B")],
}


def test_tables(tmp_path):
    paths = write_report(RESULTS, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text()) == RESULTS
    assert "| 4B | progressive | 4.00B | 2 | 8.72 | 0.774 |" in md      # Table 1: families side by side
    assert "| 4B | independent | 4.10B | 2 | 9.18 | 0.767 |" in md
    assert "acc_stderr" not in md.split("## KL")[0]
    assert "| 4B → 8B | 0.3378 | 0.4584 |" in md                            # Table 4
    assert "| independent/4B | progressive/8B | greedy | 0.4281 | 87.2 | 7 | 8 | 1.1429 |" in md  # Table 5
    assert {p.name for p in paths} >= {"report.md", "report.json"}


def test_plots_with_and_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    paths = write_report(RESULTS, tmp_path / "a")
    assert {p.name for p in paths} == {"report.md", "report.json", "perplexity.png", "kl.png", "acceptance.png"}
    assert "![kl](kl.png)" in (tmp_path / "a" / "report.md").read_text()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_report(RESULTS, tmp_path / "b")
    assert {p.name for p in paths} == {"report.md", "report.json"}
    assert "matplotlib is not installed" in (tmp_path / "b" / "report.md").read_text()
