"""The family report: report.json (everything measured), report.md (the paper's tables), PNG plots.

Tables follow Yano et al. 2025: per member validation perplexity and task scores with every
family side by side (Tables 1-3), the KL between adjacent members per family (Table 4; headline
KL(p_small || p_large), our reading of App. F, with the reverse direction, top-1 agreement and the
per-example distribution next to it), speculative decoding with the smaller member drafting for
the larger one: KL, acceptance rate, mean accepted length, generation time against the target
alone (Table 5); and which of the paper's consistency findings the run reproduces
(`findings.py`). matplotlib is optional: without it the plots are skipped and report.md says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from neox_progressive.eval.findings import findings_lines

SKIP_METRICS = ("sample_len",)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _params(n: int | None) -> str:
    if not n:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _task_columns(results: dict) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    for fam in results["families"].values():
        for m in fam["members"]:
            for task, metrics in (m.get("tasks") or {}).items():
                for metric in metrics:
                    if metric.endswith("_stderr") or metric in SKIP_METRICS or (task, metric) in cols:
                        continue
                    cols.append((task, metric))
    return cols


def eval_table(results: dict) -> str:
    """Table 1 style: one row per (member, family), families of a member next to each other."""
    cols = _task_columns(results)
    header = ["Member", "Family", "Params", "Valid loss", "Valid PPL"] + [f"{t} {m}" for t, m in cols]
    order: list[str] = []
    for fam in results["families"].values():
        order += [m["name"] for m in fam["members"] if m["name"] not in order]
    rows = []
    for name in order:
        for fam_name, fam in results["families"].items():
            m = next((x for x in fam["members"] if x["name"] == name), None)
            if m is None:
                continue
            ppl = m.get("perplexity") or {}
            rows.append([name, fam_name, _params(m.get("params")), ppl.get("loss"), ppl.get("perplexity")]
                        + [(m.get("tasks") or {}).get(t, {}).get(k) for t, k in cols])
    return _table(header, rows)


def _pairs(results: dict) -> list[dict]:
    out = []
    for fam_name, fam in results["families"].items():
        out += [dict(p, family=fam_name, draft=f"{fam_name}/{p['small']}", target=f"{fam_name}/{p['large']}")
                for p in fam.get("pairs", [])]
    return out + list(results.get("cross_pairs", []))


def kl_table(results: dict) -> str:
    """Table 4 style: rows = adjacent pairs, columns = families (headline direction)."""
    fams = list(results["families"])
    names: list[str] = []
    for fam in results["families"].values():
        names += [f"{p['small']} → {p['large']}" for p in fam.get("pairs", []) if f"{p['small']} → {p['large']}" not in names]
    rows = []
    for pair in names:
        row: list[Any] = [pair]
        for f in fams:
            hit = next((p for p in results["families"][f].get("pairs", []) if f"{p['small']} → {p['large']}" == pair), None)
            row.append((hit or {}).get("kl", {}).get("kl"))
        rows.append(row)
    return _table(["Pair (small → large)"] + [f"KL {f}" for f in fams], rows)


def kl_detail_table(results: dict) -> str:
    """Per pair: both directions, top-1 agreement, the per-example distribution, examples and positions."""
    rows = []
    for p in _pairs(results):
        kl = p.get("kl")
        if not kl:
            continue
        dist, rev = kl.get("distribution") or {}, kl.get("reverse") or {}
        top1 = kl.get("top1_agreement")
        rows.append([p["draft"], p["target"], kl.get("kl"), rev.get("kl"), None if top1 is None else 100 * top1,
                     dist.get("median"), dist.get("p90"), dist.get("p99"), dist.get("p99.9"), dist.get("max"),
                     kl.get("token_mean"), kl.get("examples"), kl.get("positions")])
    return _table(["Small", "Large", "KL(small‖large)", "KL(large‖small)", "Same top-1 (%)", "Median", "p90", "p99",
                   "p99.9", "Max", "Token mean", "Examples", "Positions"], rows)


def specdec_table(results: dict) -> str:
    """Table 5 style: draft, target, KL, acceptance, mean accepted length, time per prompt vs the target alone."""
    rows = []
    for p in _pairs(results):
        sd = p.get("specdec") or {}
        for mode, r in sd.items():
            rows.append([p["draft"], p["target"], mode, (p.get("kl") or {}).get("kl"),
                         None if r.get("acceptance_rate") is None else 100 * r["acceptance_rate"],
                         r.get("mean_accepted_length"), r.get("seconds_per_prompt"), r.get("target_seconds_per_prompt"),
                         r.get("speedup"), r.get("prompts")])
    return _table(["Draft", "Target", "Mode", "KL", "Acceptance (%)", "Mean accepted length", "Time (s/prompt)",
                   "Target alone (s/prompt)", "Speedup", "Prompts"], rows)


def _kl_text(s: dict, results: dict) -> str:
    unit = s.get("kl_on", "windows")
    what = (f"{s.get('kl_examples', '?')} validation documents sampled with seed {s.get('seed', '?')} (each: the "
            f"end-of-document token, then the document, truncated to {s.get('seq_length', '?')} tokens)"
            if unit == "documents" else f"the first {s.get('kl_examples', '?')} windows of {s.get('seq_length', '?')} "
            "tokens of the validation stream (they cross document boundaries)")
    return ("KL per token position over the tokenizer's vocabulary, averaged over the positions of an example, "
            f"then over examples (App. F). Examples (`kl_on: {unit}`): {what}. Headline direction KL(p_small ‖ "
            "p_large): our reading of App. F, whose formula did not survive in the paper text we have (the smaller, "
            "draft member judged against the larger reference); KL(p_large ‖ p_small) is next to it. Lower = more "
            "consistent family. Per-example values are in report.json.")


def render_markdown(results: dict, plots: list[str] | None = None, plot_note: str | None = None) -> str:
    s = results.get("settings", {})
    parts = [
        "# Model family evaluation",
        "",
        f"neox-progressive {results.get('neox_progressive_version', '?')}, {results.get('created', '')}. "
        f"Device {s.get('device', '?')}, dtype {s.get('dtype', '?')}.",
        "",
        "## Members (paper Tables 1-3)",
        "",
        f"Validation loss: the first {s.get('ppl_windows', '?')} windows of {s.get('seq_length', '?')} + 1 tokens "
        f"of {s.get('data', 'no data')} in file order (NeoX's validation samples, unshuffled; a training run's own "
        "validation loss averages its eval_iters x global batch first samples, so it differs when that count "
        f"differs); lm-eval tasks: {', '.join(s.get('tasks') or []) or 'none'}"
        + (f" (limit {s['limit']})" if s.get("limit") else "") + ".",
        "",
        eval_table(results),
        "",
        "## KL divergence between adjacent members (paper Table 4, App. F)",
        "",
        _kl_text(s, results),
        "",
        kl_table(results),
        "",
        kl_detail_table(results),
        "",
        "## Speculative decoding (paper Table 5)",
        "",
        f"The smaller member drafts {s.get('draft_len', '?')} tokens per round for the larger one; "
        f"{s.get('prompts', '?')} prompts of {s.get('prompt_tokens', '?')} tokens (the start of validation documents "
        f"sampled with seed {s.get('seed', '?')}), {s.get('new_tokens', '?')} new tokens each, batch size 1, "
        f"{s.get('dtype', '?')} on {s.get('device', '?')}. Acceptance = accepted / proposed draft tokens; mean accepted "
        "length = tokens per target forward pass = 1 + accepted / rounds. Sampled mode: temperature "
        f"{s.get('temperature', '?')}. Time is wall time per prompt; Speedup = target alone / speculative.",
        "",
        specdec_table(results),
        "",
    ]
    found = findings_lines(results)
    if found:
        parts += ["## The paper's consistency findings in this run", "", *found, ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    elif plot_note:
        parts += ["## Plots", "", plot_note, ""]
    return "\n".join(parts)


def plot(results: dict, out_dir: Path) -> tuple[list[Path], str | None]:
    """PNG plots (perplexity vs parameters, KL per pair, acceptance per pair); ([], reason) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib)."
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drew = False
    for fam, data in results["families"].items():
        pts = [(m["params"], m["perplexity"]["perplexity"]) for m in data["members"] if m.get("perplexity") and m.get("params")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=fam)
            drew = True
    if drew:
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation perplexity")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "perplexity.png")
        fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    pairs = _pairs(results)
    for fname, label, get in (
        ("kl.png", "KL(p_small || p_large)", lambda p: (p.get("kl") or {}).get("kl")),
        ("acceptance.png", "greedy acceptance rate",
         lambda p: ((p.get("specdec") or {}).get("greedy") or {}).get("acceptance_rate")),
    ):
        vals = [(f"{p['draft']}\n→ {p['target']}", get(p)) for p in pairs if get(p) is not None]
        if not vals:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(vals)), 3.5))
        ax.bar(range(len(vals)), [v for _, v in vals])
        ax.set_xticks(range(len(vals)), [n for n, _ in vals], fontsize=7)
        ax.set_ylabel(label)
        fig.tight_layout()
        written.append(out_dir / fname)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written, None


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write report.json, the plots and report.md into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots, note = plot(results, out)
    (out / "report.md").write_text(render_markdown(results, [str(p) for p in plots], note))
    return [out / "report.json", out / "report.md", *plots]
