"""The family report: report.json (everything measured), report.md (the paper's tables), PNG plots.

Tables follow Yano et al. 2025: per member validation perplexity and task scores with every
family side by side (Tables 1-3), KL(p_small || p_large) between adjacent members per family
(Table 4), and speculative decoding with the smaller member drafting for the larger one:
KL, acceptance rate and generation time against the target alone (Table 5). matplotlib is
optional: without it the plots are skipped and report.md says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


def members_table(results: dict) -> str:
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
    """Table 4 style: rows = adjacent pairs, columns = families."""
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


def specdec_table(results: dict) -> str:
    """Table 5 style: draft, target, KL, acceptance (greedy, sampled), time per prompt vs the target alone."""
    rows = []
    for p in _pairs(results):
        sd = p.get("specdec") or {}
        for mode, r in sd.items():
            rows.append([p["draft"], p["target"], mode, (p.get("kl") or {}).get("kl"),
                         None if r.get("acceptance_rate") is None else 100 * r["acceptance_rate"],
                         r.get("seconds_per_prompt"), r.get("target_seconds_per_prompt"), r.get("speedup")])
    return _table(["Draft", "Target", "Mode", "KL", "Acceptance (%)", "Time (s/prompt)", "Target alone (s/prompt)",
                   "Speedup"], rows)


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
        f"Validation: {s.get('ppl_windows', '?')} windows of {s.get('seq_length', '?')} tokens "
        f"({s.get('data', 'no data')}); lm-eval tasks: {', '.join(s.get('tasks') or []) or 'none'}"
        + (f" (limit {s['limit']})" if s.get("limit") else "") + ".",
        "",
        members_table(results),
        "",
        "## KL divergence between adjacent members (paper Table 4, App. F)",
        "",
        "KL(p_small || p_large) per token position over the tokenizer's vocabulary, averaged over the positions "
        f"of an example, then over {s.get('kl_windows', '?')} examples. Lower = more consistent family.",
        "",
        kl_table(results),
        "",
        "## Speculative decoding (paper Table 5)",
        "",
        f"The smaller member drafts {s.get('draft_len', '?')} tokens per round for the larger one; "
        f"{s.get('prompts', '?')} prompts of {s.get('prompt_tokens', '?')} tokens, {s.get('new_tokens', '?')} new tokens "
        f"each, batch size 1. Acceptance = accepted / proposed draft tokens. Sampled mode: temperature "
        f"{s.get('temperature', '?')}. Time is wall time per prompt; Speedup = target alone / speculative.",
        "",
        specdec_table(results),
        "",
    ]
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
