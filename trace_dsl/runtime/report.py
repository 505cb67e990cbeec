"""The training report of a run: `report.md` with PNG plots of the loss terms and verdict counts.

Plots are drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from trace_dsl.triage.verdict import Category, Verdict

# The logged loss terms, in the order the report lists them.
LOSS_TERMS = ("loss/inversion", "loss/npo", "loss/kl", "loss/total")


def plot_loss_terms(metrics: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Draw each loss term against the optimiser step into `path`; False when there is no step."""
    rows = [row for row in metrics if "step" in row and "loss/total" in row]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in rows]
    for term in LOSS_TERMS:
        ax.plot(steps, [row.get(term, float("nan")) for row in rows], label=term.split("/")[1], marker=".")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (weighted contribution)")
    ax.set_title("Hybrid objective by term")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_verdict_counts(counts: Mapping[str, int], path: Path) -> None:
    """Draw a bar chart of the number of pairs per triage category into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [category.value for category in Category]
    values = [counts.get(name, 0) for name in names]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(names, values, color=["#c44e52", "#dd8452", "#55a868", "#8c8c8c"])
    ax.bar_label(bars)
    ax.set_ylabel("pairs")
    ax.set_title("Triage verdicts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """The number of verdicts per category, with every category present."""
    counter = Counter(verdict.category.value for verdict in verdicts)
    return {category.value: counter.get(category.value, 0) for category in Category}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_report(
    run_root: Path,
    manifest: Mapping[str, Any],
    verdicts: Sequence[Verdict],
    split_counts: Mapping[str, Mapping[str, int]],
    metrics: Sequence[Mapping[str, Any]],
) -> Path:
    """Write `report.md` and its plots into the run directory and return the report's path.

    Args:
        run_root: the run directory.
        manifest: the run's manifest (policy, data, model, configuration, times).
        verdicts: every verdict of the triage.
        split_counts: pairs per category in the `train` and `heldout` parts.
        metrics: the rows of `metrics.jsonl`.
    """
    plots = run_root / "plots"
    plots.mkdir(exist_ok=True)
    counts = verdict_counts(verdicts)
    plot_verdict_counts(counts, plots / "verdicts.png")
    has_loss_plot = plot_loss_terms(metrics, plots / "loss_terms.png")

    config = manifest.get("config", {})
    model = manifest.get("model", {})
    lines = [
        f"# TRACE run: {run_root.name}",
        "",
        f"- policy: `{manifest.get('policy', {}).get('path', '?')}` (hash `{manifest.get('policy', {}).get('hash', '?')}`)",
        f"- data: `{manifest.get('data', {}).get('path', '?')}` (hash `{manifest.get('data', {}).get('hash', '?')}`)",
        f"- model: `{model.get('name', '?')}` resolved to `{model.get('id', '?')}`",
        f"- status: {manifest.get('status', '?')}, started {manifest.get('started_at', '?')}, "
        f"ended {manifest.get('ended_at', '?')}",
        f"- training: {manifest.get('training', {}).get('steps', '?')} steps in {manifest.get('training', {}).get('seconds', '?')} s; "
        f"impact scores {'reused' if manifest.get('impact', {}).get('reused') else 'computed'} "
        f"({manifest.get('impact', {}).get('timings', {}).get('total', 0):.0f} s)",
        f"- seed {config.get('seed', '?')}, beta {config.get('beta', '?')}, alpha_kl {config.get('alpha_kl', '?')}, "
        f"inversion loss `{config.get('inversion_loss', '?')}`, batching `{config.get('batching', '?')}`, "
        f"impact weights {'on' if config.get('impact', {}).get('enabled', True) else 'off'} "
        f"(scaling `{config.get('impact', {}).get('weight_scaling', '?')}`)",
        "",
        "## Triage",
        "",
    ]
    rows = [
        [name, counts[name], split_counts.get("train", {}).get(name, 0), split_counts.get("heldout", {}).get(name, 0)]
        for name in counts
    ]
    lines += _table(["category", "pairs", "train", "held out"], rows)
    lines += ["", "![verdict counts](plots/verdicts.png)", "", "## Training", ""]
    steps = [row for row in metrics if "loss/total" in row]
    if steps:
        first, last = steps[0], steps[-1]
        rows = [[term.split("/")[1], f"{first.get(term, float('nan')):.4f}", f"{last.get(term, float('nan')):.4f}"] for term in LOSS_TERMS]
        lines += [f"{len(steps)} optimiser steps.", ""]
        lines += _table(["term", f"step {first['step']}", f"step {last['step']}"], rows)
        if has_loss_plot:
            lines += ["", "![loss terms](plots/loss_terms.png)"]
    else:
        lines.append("No optimiser step was logged.")
    lines.append("")
    path = run_root / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
