"""The result of `trace diff`, and its three renderings: a terminal table, JSON and markdown.

The markdown form is meant to be pasted (or posted by CI) as a pull-request comment: the verdict
summary first, the rule changes, the flip matrix, then collapsed sample pairs per transition.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from trace_dsl.versions.replay import CATEGORIES, FlipMatrix, FlipSample, Transition, format_transition
from trace_dsl.versions.static import ChangeKind, StaticDiff

DIFF_SCHEMA_VERSION = 1

# Characters of prompt and response text shown per sample in table and markdown output.
SAMPLE_TEXT_CHARS = 240


@dataclass(frozen=True, slots=True)
class TriageWork:
    """Expensive-predicate work done by one triage.

    Attributes:
        evaluated: requests sent to each expensive predicate's backend, by predicate name.
        cached: requests found in the result cache, over all predicates.
        seconds: wall time of the triage.
    """

    evaluated: Mapping[str, int]
    cached: int
    seconds: float

    @property
    def total_evaluated(self) -> int:
        """Requests sent to any backend."""
        return sum(self.evaluated.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return {"evaluated": dict(self.evaluated), "cached": self.cached, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True, slots=True)
class DiffReport:
    """Everything `trace diff` found.

    Attributes:
        old_ref: the old policy as the user named it (`policy.tp@HEAD~1`).
        new_ref: the new policy as the user named it.
        static: rule and predicate changes.
        dataset: `{"path": ..., "hash": ..., "pairs": ...}` of the replayed data.
        matrix: the flip matrix, old category by new category.
        samples: sample pairs per transition.
        transition: the transition the samples were restricted to, if any.
        work: expensive-predicate work of each version's triage, keyed "old" and "new".
        seconds: wall time of the replay.
    """

    old_ref: str
    new_ref: str
    static: StaticDiff
    dataset: Mapping[str, Any]
    matrix: FlipMatrix
    samples: Mapping[Transition, list[FlipSample]]
    transition: Transition | None = None
    work: Mapping[str, TriageWork] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        """The number of pairs whose category differs between the versions."""
        return self.matrix.changed

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict with `schema_version`."""
        return {
            "schema_version": DIFF_SCHEMA_VERSION,
            "old": self.old_ref,
            "new": self.new_ref,
            "dataset": dict(self.dataset),
            "static": self.static.to_dict(),
            "flips": self.matrix.to_dict(),
            "transition": format_transition(self.transition) if self.transition else None,
            "samples": [
                {"transition": format_transition(key), "pairs": [s.to_dict() for s in samples]}
                for key, samples in self.samples.items()
            ],
            "work": {version: work.to_dict() for version, work in self.work.items()},
            "seconds": round(self.seconds, 3),
        }


def render_json(report: DiffReport) -> str:
    """Render the report as indented JSON."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


# ---- Shared wording -----------------------------------------------------------------------------


def _percent(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "0.0%"


def _headline(report: DiffReport) -> str:
    total = report.matrix.total
    if report.changed == 0:
        return f"No pair changes verdict ({total} pairs replayed)."
    return f"{report.changed} of {total} pairs change verdict ({_percent(report.changed, total)})."


def _short_hash(value: object) -> str:
    """Return the first 12 hex digits of a hash, without an algorithm prefix such as `sha256:`."""
    return str(value or "").rsplit(":", 1)[-1][:12]


def _rules(rules: tuple[str, ...] | list[str]) -> str:
    return ", ".join(rules) if rules else "none"


def _shorten(text: str, limit: int = SAMPLE_TEXT_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _work_line(report: DiffReport) -> str | None:
    parts = []
    for version in ("old", "new"):
        work = report.work.get(version)
        if work is not None and (work.total_evaluated or work.cached):
            parts.append(f"{version}: {work.total_evaluated} evaluated, {work.cached} from cache")
    return "Expensive predicates: " + "; ".join(parts) + "." if parts else None


# ---- Markdown -----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    # Pair texts are data: escaped, a `</details>`, a tag or a backtick run cannot change the layout.
    text = " ".join(text.split())
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "\\`")):
        text = text.replace(char, escaped)
    return text


def _fence(lines: list[str]) -> str:
    """Return a code fence longer than any backtick run in `lines`, so none of them closes it."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(report: DiffReport) -> str:
    """Render the report as GitHub-flavoured markdown for a pull-request comment."""
    static = report.static
    lines = [f"### Policy diff: `{report.old_ref}` → `{report.new_ref}`", ""]
    lines.append(f"**{_headline(report)}**")
    lines.append("")
    lines.append(
        f"Policy hash `{static.old_hash[:12]}` → `{static.new_hash[:12]}`; data `{report.dataset.get('path')}` "
        f"(hash `{_short_hash(report.dataset.get('hash'))}`, {report.matrix.total} pairs)."
    )
    work = _work_line(report)
    if work:
        lines.append(work)
    lines.append("")

    lines.append("#### Rules and predicates")
    lines.append("")
    if not static.changes and not static.header:
        lines.append("No rule or predicate changed.")
    else:
        lines.append("| change | element | id | title |")
        lines.append("|---|---|---|---|")
        for name, (before, after) in static.header.items():
            lines.append(f"| changed | header | `{name}` | {_cell(before)} → {_cell(after)} |")
        for change in static.changes:
            title = _cell(change.title)
            if change.old_title:
                title = f"{_cell(change.old_title)} → {title}"
            if change.kind is ChangeKind.AFFECTED:
                title = (title + " " if title else "") + f"(uses {', '.join(change.because)})"
            lines.append(f"| {change.kind.value} | {change.element} | `{change.id}` | {title} |")
        edited = [c for c in static.changes if c.kind is not ChangeKind.AFFECTED and c.old != c.new]
        if edited:
            body = []
            for change in edited:
                if change.old is not None:
                    body.append(f"- {change.element} {change.id}: {' '.join(change.old.split())}")
                if change.new is not None:
                    body.append(f"+ {change.element} {change.id}: {' '.join(change.new.split())}")
            fence = _fence(body)
            lines += ["", "<details><summary>Definitions</summary>", "", f"{fence}diff", *body, fence, "", "</details>"]
    lines.append("")

    lines.append("#### Flip matrix (rows: old verdict, columns: new verdict)")
    lines.append("")
    header = " | ".join(c.value for c in CATEGORIES)
    lines.append(f"| old \\ new | {header} | total |")
    lines.append("|---|" + "---:|" * (len(CATEGORIES) + 1))
    matrix = report.matrix
    for old in CATEGORIES:
        cells = []
        for new in CATEGORIES:
            n = matrix.count(old, new)
            text = str(n) if n else "·"
            cells.append(f"**{text}**" if n and old != new else text)
        lines.append(f"| **{old.value}** | " + " | ".join(cells) + f" | {matrix.old_total(old)} |")
    totals = " | ".join(str(matrix.new_total(c)) for c in CATEGORIES)
    lines.append(f"| total | {totals} | {matrix.total} |")
    lines.append("")

    moves = matrix.transitions(changed_only=True)
    if moves:
        lines.append("| transition | pairs | share |")
        lines.append("|---|---:|---:|")
        for old, new in moves:
            n = matrix.count(old, new)
            lines.append(f"| {old.value} → {new.value} | {n} | {_percent(n, matrix.total)} |")
        lines.append("")

    if report.samples:
        lines.append("#### Samples")
        lines.append("")
        for (old, new), samples in report.samples.items():
            n = matrix.count(old, new)
            lines.append(f"<details><summary>{old.value} → {new.value}: {len(samples)} of {n} pairs</summary>")
            lines.append("")
            for sample in samples:
                lines.append(f"- pair {sample.index} (`{sample.pair.id}`{', ' + sample.pair.source if sample.pair.source else ''})")
                lines.append(f"  - prompt: {_cell(_shorten(sample.pair.prompt))}")
                lines.append(f"  - chosen: {_cell(_shorten(sample.pair.chosen))}")
                lines.append(f"  - rejected: {_cell(_shorten(sample.pair.rejected))}")
                lines.append(
                    f"  - before: chosen rules {_rules(sample.old.chosen_rules)}; rejected rules {_rules(sample.old.rejected_rules)}"
                )
                lines.append(
                    f"  - after: chosen rules {_rules(sample.new.chosen_rules)}; rejected rules {_rules(sample.new.rejected_rules)}"
                )
                for label, verdict in (("before", sample.old), ("after", sample.new)):
                    if verdict.error:
                        lines.append(f"  - error {label}: {_cell(verdict.error)}")
            lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- Terminal table -----------------------------------------------------------------------------


def render_table(report: DiffReport, console: Console) -> None:
    """Print the report as rich tables on `console`."""
    static = report.static
    console.print(f"policy diff: {report.old_ref} -> {report.new_ref}", markup=False, highlight=False)
    console.print(
        f"policy hash {static.old_hash[:12]} -> {static.new_hash[:12]}; data {report.dataset.get('path')} "
        f"({report.matrix.total} pairs)",
        markup=False,
        highlight=False,
    )
    console.print()

    if not static.changes and not static.header:
        console.print("no rule or predicate changed", markup=False)
    else:
        changes = Table(title="rules and predicates", title_justify="left")
        for column in ("change", "element", "id", "title / definition"):
            changes.add_column(column, overflow="fold")
        for name, (before, after) in static.header.items():
            changes.add_row("changed", "header", name, f"{before} -> {after}")
        for change in static.changes:
            if change.kind is ChangeKind.AFFECTED:
                detail = f"{change.title} (uses {', '.join(change.because)})".strip()
            elif change.kind is ChangeKind.CHANGED and change.old != change.new:
                detail = f"- {change.old}\n+ {change.new}"
            elif change.kind is ChangeKind.CHANGED:
                detail = f"title: {change.old_title} -> {change.title}"
            else:
                detail = change.new if change.kind is ChangeKind.ADDED else change.old or ""
                detail = f"{change.title}\n{detail}" if change.title else detail
            changes.add_row(change.kind.value, change.element, change.id, detail)
        console.print(changes)
    console.print()

    matrix = report.matrix
    flips = Table(title="flip matrix (rows: old, columns: new)", title_justify="left")
    flips.add_column("old \\ new")
    for category in CATEGORIES:
        flips.add_column(category.value, justify="right")
    flips.add_column("total", justify="right")
    for old in CATEGORIES:
        cells = []
        for new in CATEGORIES:
            n = matrix.count(old, new)
            cells.append(f"{n} ({_percent(n, matrix.total)})" if n else "·")
        flips.add_row(old.value, *cells, str(matrix.old_total(old)))
    flips.add_row("total", *(str(matrix.new_total(c)) for c in CATEGORIES), str(matrix.total))
    console.print(flips)
    console.print(_headline(report), markup=False, highlight=False)
    work = _work_line(report)
    if work:
        console.print(work, markup=False, highlight=False)

    for (old, new), samples in report.samples.items():
        console.print()
        console.print(
            f"{old.value} -> {new.value}: {len(samples)} of {matrix.count(old, new)} pairs", markup=False, highlight=False
        )
        for sample in samples:
            console.print(f"  pair {sample.index} ({sample.pair.id}) {sample.pair.source}".rstrip(), markup=False, highlight=False)
            for label, text in (("prompt", sample.pair.prompt), ("chosen", sample.pair.chosen), ("rejected", sample.pair.rejected)):
                console.print(f"    {label}: {_shorten(text)}", markup=False, highlight=False)
            for label, verdict in (("before", sample.old), ("after", sample.new)):
                line = f"    {label}: chosen rules {_rules(verdict.chosen_rules)}; rejected rules {_rules(verdict.rejected_rules)}"
                if verdict.error:
                    line += f"; error: {verdict.error}"
                console.print(line, markup=False, highlight=False)
