"""Which of the paper's consistency findings a report reproduces, with the examples behind each figure.

Yano et al. 2025:
- Table 4 (Section 5.2): for every adjacent pair, the progressive family's KL is lower than the
  independent family's.
- Table 5 (Section 5.3): with the progressive larger member as the target, the progressive
  smaller member as draft has a lower KL and a higher acceptance rate than the independent
  smaller member.

Each comparison is paired: both figures come from the same examples (documents, prompts), so the
difference is taken example by example, and it is called *resolved* when the mean difference is
more than two standard errors of those per-example differences away from zero (the spread from
which examples were drawn; the spread between training runs, seeds, is the demo's to measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """One of the paper's claims, measured: progressive figure vs independent figure on the same examples."""

    claim: str
    """What the paper finds, e.g. "KL s → m: progressive < independent (Table 4)"."""
    progressive: float
    independent: float
    n: int
    """Examples (KL) or prompts (acceptance) behind both figures."""
    unit: str
    """documents, windows or prompts."""
    stderr: float | None
    """Standard error of the mean paired difference (None when the examples differ)."""
    lower_is_paper: bool
    """True if the paper's direction is progressive < independent (KL), False if > (acceptance)."""

    @property
    def difference(self) -> float:
        return self.progressive - self.independent

    @property
    def as_paper(self) -> bool:
        return (self.difference < 0) if self.lower_is_paper else (self.difference > 0)

    @property
    def resolved(self) -> bool | None:
        """|difference| > 2 standard errors of the examples (None: no paired spread)."""
        if self.stderr is None:
            return None
        return abs(self.difference) > 2 * self.stderr

    def verdict(self) -> str:
        if self.resolved is False:
            return "not resolved (within 2 standard errors of the examples)"
        return "as the paper" if self.as_paper else "opposite of the paper"

    def to_dict(self) -> dict:
        return {"claim": self.claim, "progressive": self.progressive, "independent": self.independent, "n": self.n,
                "unit": self.unit, "difference": self.difference, "stderr": self.stderr, "verdict": self.verdict()}


def _paired(a: list[float], b: list[float], src_a, src_b) -> float | None:
    if not a or len(a) != len(b) or src_a != src_b:
        return None
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


def _kl_comparison(claim: str, prog: dict, ind: dict) -> Comparison:
    pa, pb = prog.get("per_example") or {}, ind.get("per_example") or {}
    return Comparison(claim, prog["kl"], ind["kl"], prog.get("examples", 0), prog.get("unit", "windows"),
                      _paired(pa.get("kl", []), pb.get("kl", []), pa.get("source"), pb.get("source")), True)


def _rates(r: dict) -> list[float]:
    pp = r.get("per_prompt") or {}
    return [a / d if d else 0.0 for a, d in zip(pp.get("accepted", []), pp.get("drafted", []))]


def _acceptance_comparison(claim: str, prog: dict, ind: dict, same_prompts: bool) -> Comparison:
    se = _paired(_rates(prog), _rates(ind), 0, 0) if same_prompts else None
    return Comparison(claim, prog["acceptance_rate"], ind["acceptance_rate"], prog.get("prompts", 0), "prompts", se, False)


def _same_draft(p: dict, c: dict) -> bool:
    """The two drafts are one model (e.g. the smallest member, trained once or identically for both families):
    every per-example KL to the same target is equal, so Table 5's comparison says nothing."""
    a, b = ((x.get("kl") or {}).get("per_example") or {} for x in (p, c))
    return bool(a.get("kl")) and a.get("kl") == b.get("kl") and a.get("source") == b.get("source")


def comparisons(results: dict, progressive: str = "progressive", independent: str = "independent") -> list[Comparison]:
    """The paper's Table 4 and Table 5 claims, as measured in an evaluation's results (empty without both families)."""
    fams = results.get("families", {})
    if progressive not in fams or independent not in fams:
        return []
    out = []
    ind_pairs = {(p["small"], p["large"]): p for p in fams[independent].get("pairs", [])}
    for p in fams[progressive].get("pairs", []):
        q = ind_pairs.get((p["small"], p["large"]))
        if q and p.get("kl") and q.get("kl"):
            out.append(_kl_comparison(f"KL {p['small']} → {p['large']}: progressive < independent (Table 4)",
                                      p["kl"], q["kl"]))
    prog_pairs = {(p["small"], p["large"]): p for p in fams[progressive].get("pairs", [])}
    for c in results.get("cross_pairs", []):
        if not (c["draft"].startswith(independent + "/") and c["target"].startswith(progressive + "/")):
            continue
        p = prog_pairs.get((c["small"], c["large"]))
        if p is None or _same_draft(p, c):
            continue
        pair = f"{c['small']} → {c['large']}"
        if p.get("kl") and c.get("kl"):
            out.append(_kl_comparison(f"Table 5, KL of the draft {pair}: progressive draft < independent draft",
                                      p["kl"], c["kl"]))
        same = p.get("specdec_prompt_source") == c.get("specdec_prompt_source")
        for mode, r in (p.get("specdec") or {}).items():
            other = (c.get("specdec") or {}).get(mode)
            if other and r.get("acceptance_rate") is not None and other.get("acceptance_rate") is not None:
                out.append(_acceptance_comparison(
                    f"Table 5, {mode} acceptance {pair}: progressive draft > independent draft", r, other, same))
    return out


def findings_lines(results: dict) -> list[str]:
    """Markdown lines: each claim, both figures, the difference, its spread, the verdict."""
    comps = comparisons(results)
    if not comps:
        return []
    lines = ["| Paper's finding | Progressive | Independent | Difference | 2 x std. error | Examples | Verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in comps:
        fmt = (lambda v: f"{100 * v:.1f}%") if c.unit == "prompts" else (lambda v: f"{v:.4f}")
        se = "-" if c.stderr is None else fmt(2 * c.stderr)
        lines.append(f"| {c.claim} | {fmt(c.progressive)} | {fmt(c.independent)} | {fmt(c.difference)} | {se} | "
                     f"{c.n} {c.unit} | {c.verdict()} |")
    same = sum(c.as_paper and c.resolved is not False for c in comps)
    lines += ["", f"This run reproduces {same} of the paper's {len(comps)} consistency findings listed above "
              "(differences within two standard errors of the examples are not counted either way)."]
    same_drafts = [f"{c['draft']} → {c['target']}" for c in results.get("cross_pairs", []) if any(
        _same_draft(p, c) for p in results["families"].get("progressive", {}).get("pairs", [])
        if (p["small"], p["large"]) == (c["small"], c["large"]))]
    if same_drafts:
        lines.append(f"Not compared: {', '.join(same_drafts)} (its draft is the same model as the progressive one).")
    return lines


def _fmt(c: Comparison, v: float) -> str:
    return f"{100 * v:.1f}%" if c.unit == "prompts" else f"{v:.4f}"


def seeds_summary(reports: list[dict]) -> list[str]:
    """The paper's findings over training runs with different seeds (one evaluation report each): per finding the
    figures of every seed, the examples behind them, and whether the difference between the families is larger than
    the spread between seeds (the range of either family's figure over the seeds)."""
    per_seed = [comparisons(r) for r in reports]
    if not per_seed or not per_seed[0]:
        return ["(no progressive and independent families to compare)"]
    n = len(per_seed)
    lines = [f"The paper's consistency findings in this run ({n} seed{'s' if n > 1 else ''}; "
             "per seed, both families are scored on the same documents and prompts):", "",
             "| paper's finding | examples per seed | progressive | independent | mean difference | "
             + ("seed spread | verdict |" if n > 1 else "2 x std. error (examples) | verdict |"),
             "|---|---|---|---|---|---|---|"]
    held = 0
    for i, c in enumerate(per_seed[0]):
        runs = [seed[i] for seed in per_seed if i < len(seed) and seed[i].claim == c.claim]
        prog, ind = [r.progressive for r in runs], [r.independent for r in runs]
        diff = sum(r.difference for r in runs) / len(runs)
        if n > 1:
            spread = max(max(prog) - min(prog), max(ind) - min(ind))
            same_sign = all((r.difference > 0) == (diff > 0) for r in runs)
            larger = same_sign and abs(diff) > spread
            as_paper = (diff < 0) if c.lower_is_paper else (diff > 0)
            verdict = ("as the paper" if as_paper else "opposite of the paper") + (
                ", larger than the seed spread" if larger else ", NOT larger than the seed spread")
            held += larger and as_paper
            noise = _fmt(c, spread)
        else:
            verdict, noise = c.verdict(), "-" if c.stderr is None else _fmt(c, 2 * c.stderr)
            held += c.as_paper and c.resolved is not False
        lines.append(f"| {c.claim} | {c.n} {c.unit} | {' / '.join(_fmt(c, v) for v in prog)} | "
                     f"{' / '.join(_fmt(c, v) for v in ind)} | {_fmt(c, diff)} | {noise} | {verdict} |")
    what = "in the paper's direction and larger than the spread between seeds" if n > 1 else \
        "in the paper's direction (one seed: the run-to-run spread is not measured; pass --seeds 2 or more)"
    lines += ["", f"Reproduced: {held} of {len(per_seed[0])} findings {what}."]
    return lines
