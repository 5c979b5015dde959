"""report.md / report.json / plots from a results dict (the paper's Tables 1, 4 and 5 side by side)."""

import json
import statistics
import sys

import pytest

from neox_progressive.eval.report import write_report


def member(name, params, ppl, acc):
    return {"name": name, "params": params, "perplexity": {"loss": 2.0, "perplexity": ppl},
            "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.01}}}


def pair(small, large, kl, acc):
    return {"small": small, "large": large, "kl": {"kl": kl},
            "specdec": {"greedy": {"acceptance_rate": acc, "mean_accepted_length": 1 + 8 * acc, "seconds_per_prompt": 7.0,
                                   "target_seconds_per_prompt": 8.0, "speedup": 8 / 7, "prompts": 1000}}}


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
    assert "| independent/4B | progressive/8B | greedy | 0.4281 | 87.2 | 7.976 | 7 | 8 | 1.1429 | 1000 |" in md  # Table 5
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


def test_findings_of_the_paper_with_the_paper_numbers(tmp_path):
    write_report(RESULTS, tmp_path)
    md = (tmp_path / "report.md").read_text().split("## The paper's consistency findings in this run")[1]
    assert "| KL 4B → 8B: progressive < independent (Table 4) | 0.3378 | 0.4584 | -0.1206 | - |" in md
    assert "| Table 5, KL of the draft 4B → 8B: progressive draft < independent draft | 0.3378 | 0.4281 |" in md
    assert "| Table 5, greedy acceptance 4B → 8B: progressive draft > independent draft | 93.2% | 87.2% | 6.0% |" in md
    assert md.count("as the paper") == 3 and "reproduces 3 of the paper's 3" in md


def with_examples(kl_prog, kl_ind, acc_prog, acc_ind):
    res = json.loads(json.dumps(RESULTS))
    for fam, vals in (("progressive", kl_prog), ("independent", kl_ind)):
        res["families"][fam]["pairs"][0]["kl"] = {"kl": sum(vals) / len(vals), "examples": len(vals), "unit": "documents",
                                                  "per_example": {"kl": vals, "source": list(range(len(vals)))}}
    for pair, acc in ((res["families"]["progressive"]["pairs"][0], acc_prog), (res["cross_pairs"][0], acc_ind)):
        pair["specdec"]["greedy"].update(acceptance_rate=sum(a for a, _ in acc) / sum(d for _, d in acc), prompts=len(acc),
                                         per_prompt={"accepted": [a for a, _ in acc], "drafted": [d for _, d in acc]})
        pair["specdec_prompt_source"] = [7, 3, 5]
    return res


def test_findings_say_when_a_difference_is_within_the_spread_of_the_examples():
    from neox_progressive.eval.findings import comparisons

    prog, ind = [0.30, 0.52, 0.21, 0.40], [0.33, 0.50, 0.25, 0.37]        # paired differences -.03 .02 -.04 .03
    res = with_examples(prog, ind, [(7, 8), (6, 8), (8, 8)], [(2, 8), (3, 8), (1, 8)])
    table4, table5_kl, table5_acc = comparisons(res)
    d = [a - b for a, b in zip(prog, ind)]
    assert table4.stderr == pytest.approx(statistics.stdev(d) / 2)
    assert table4.verdict().startswith("not resolved") and table4.n == 4 and table4.unit == "documents"
    assert table5_kl.verdict() == "as the paper" and table5_kl.stderr is None   # cross pair without per-example values
    rates = [7 / 8 - 2 / 8, 6 / 8 - 3 / 8, 8 / 8 - 1 / 8]
    assert table5_acc.stderr == pytest.approx(statistics.stdev(rates) / 3 ** 0.5)
    assert table5_acc.verdict() == "as the paper" and table5_acc.progressive == pytest.approx(21 / 24)
    flipped = with_examples(ind, prog, [(1, 8), (2, 8), (1, 8)], [(7, 8), (6, 8), (8, 8)])
    assert comparisons(flipped)[2].verdict() == "opposite of the paper"


def test_findings_over_seeds():
    from neox_progressive.eval.findings import seeds_summary

    a = with_examples([0.30, 0.32], [0.45, 0.47], [(7, 8)], [(5, 8)])
    b = with_examples([0.34, 0.36], [0.41, 0.43], [(6, 8)], [(6, 8)])
    text = "\n".join(seeds_summary([a, b]))
    # KL: progressive 0.31 / 0.35, independent 0.46 / 0.42: difference -0.11 beyond the seed spread 0.04
    assert "| 2 documents | 0.3100 / 0.3500 | 0.4600 / 0.4200 | -0.1100 | 0.0400 | as the paper, larger than the seed spread |" \
        in text
    # acceptance: 87.5% / 75.0% vs 62.5% / 75.0%: difference 12.5% within the seed spread 12.5%
    assert "| 1 prompts | 87.5% / 75.0% | 62.5% / 75.0% | 12.5% | 12.5% | as the paper, NOT larger than the seed spread |" \
        in text
    assert "Reproduced: 2 of 3 findings" in text


def test_a_draft_that_is_the_same_model_in_both_families_is_not_compared():
    from neox_progressive.eval.findings import comparisons, findings_lines

    res = with_examples([0.30, 0.32], [0.45, 0.47], [(7, 8)], [(5, 8)])
    res["cross_pairs"][0]["kl"] = dict(res["families"]["progressive"]["pairs"][0]["kl"])   # the same draft model
    claims = [c.claim for c in comparisons(res)]
    assert claims == ["KL 4B → 8B: progressive < independent (Table 4)"]
    assert "Not compared: independent/4B → progressive/8B (its draft is the same model" in "\n".join(findings_lines(res))
