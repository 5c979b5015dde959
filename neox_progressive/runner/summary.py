"""What a family run prints and draws at the end: the trained members' table and the paper's Fig. 2.

Fig. 2 of Yano et al. (2025) plots validation loss against training FLOPs; a progressive member's
curve starts at the FLOPs its smaller members already spent (the family's cumulative cost), an
independent member's at zero. `loss_curves` builds those curves from the builtin engine's metrics
files (`kind: valid` records: iteration, loss, flops = 6 x params x tokens of that stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_curves(results: dict[str, dict[str, dict[str, Any]]], members: list[str]) -> dict[str, list[dict[str, Any]]]:
    """{mode: [{member, flops: [...], loss: [...]}]} with FLOPs offset by the mode's earlier members."""
    from neox_progressive.train import read_metrics

    curves: dict[str, list[dict[str, Any]]] = {}
    for mode, steps in results.items():
        offset = 0.0
        for name in members:
            info = steps.get(f"{name}/train") or {}
            path = info.get("metrics")
            if not path or not Path(path).is_file():
                continue
            valid = read_metrics(path, "valid")
            base = offset if mode == "progressive" else 0.0
            curves.setdefault(mode, []).append({"member": name, "flops": [base + r["flops"] for r in valid],
                                                "loss": [r["loss"] for r in valid]})
            offset += float(info.get("flops") or (valid[-1]["flops"] if valid else 0.0))
    return curves


def plot_loss_vs_flops(curves: dict[str, list[dict[str, Any]]], out: Path) -> Path | None:
    """Validation loss against cumulative FLOPs, both families on one plot; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"progressive": "-", "independent": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for mode, items in curves.items():
        for i, c in enumerate(items):
            ax.plot(c["flops"], c["loss"], styles.get(mode, ":"), color=colors[i % len(colors)], marker=".",
                    label=f"{c['member']} ({mode})")
    ax.set_xlabel("training FLOPs (progressive: including the smaller members)")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss vs FLOPs (cf. Yano et al. 2025, Fig. 2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def training_table(results: dict[str, dict[str, dict[str, Any]]], members: list[str]) -> str:
    """A markdown table: per mode and member, tokens, FLOPs, cumulative FLOPs, start and final validation loss."""
    lines = ["| mode | member | tokens | FLOPs | cumulative FLOPs | start valid loss | final valid loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode, steps in results.items():
        cum = 0.0
        for name in members:
            info = steps.get(f"{name}/train")
            if not info:
                continue
            flops = float(info.get("flops") or 0.0)
            cum += flops
            shown = f"{name} (= {info['reused_from']} {name})" if info.get("reused_from") else name
            lines.append(f"| {mode} | {shown} | {_num(info.get('tokens'))} | {_num(flops)} | {_num(cum)} | "
                         f"{_loss(info.get('start_valid_loss'))} | {_loss(info.get('final_valid_loss'))} |")
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x in (None, 0, 0.0) else f"{float(x):.3e}"


def _loss(x: Any) -> str:
    return "-" if x is None else f"{float(x):.4f}"


def summarize(runs: list, png: Path) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str], Path | None]:
    """The results of finished FamilyRuns ({mode: {step: info}}), the member names, and the loss-vs-FLOPs plot
    written to `png` (None without matplotlib)."""
    results = {r.mode: r.results for r in runs}
    names = runs[0].names
    return results, names, plot_loss_vs_flops(loss_curves(results, names), png)


def summary_text(results: dict, names: list[str], plot: Path | None, report: Path | None) -> str:
    """The members table and where the plot and the evaluation report are."""
    lines = [training_table(results, names)]
    for mode, steps in results.items():
        for name in names:
            src = (steps.get(f"{name}/train") or {}).get("reused_from")
            if src:
                lines.append(f"\n{mode} {name} is the {src} family's {name}, trained once: the same model in both families "
                             "(same budget, data window and schedule; run --mode both checks the two stage configs).")
    if plot:
        lines.append(f"\nvalidation loss vs cumulative FLOPs: {plot}")
    if report:
        lines.append(f"evaluation report (perplexity, KL, speculative decoding): {report / 'report.md'}")
    return "\n".join(lines)
