"""The static diff of rules and predicates, and the markdown and JSON renderings of a report."""

from __future__ import annotations

import io
import json

from rich.console import Console

from trace_dsl.data.records import PreferencePair
from trace_dsl.triage.verdict import Category, Verdict
from trace_dsl.versions.replay import flip_matrix, sample_flips
from trace_dsl.versions.report import DiffReport, TriageWork, render_json, render_markdown, render_table
from trace_dsl.compiler.policy import PolicyElement
from trace_dsl.versions.static import ChangeKind, diff_elements


def rule(ident: str, text: str, title: str = "", uses: set[str] | None = None) -> PolicyElement:
    return PolicyElement("rule", ident, title or ident, text, frozenset(uses or ()))


def predicate(ident: str, text: str, uses: set[str] | None = None) -> PolicyElement:
    return PolicyElement("predicate", ident, "", text, frozenset(uses or ()))


def let(ident: str, text: str) -> PolicyElement:
    return PolicyElement("let", ident, "", text, frozenset())


OLD_PREDICATES = {
    "limit": let("limit", "3"),
    "long": predicate("long", "words(response) > limit", {"limit"}),
    "weapons": predicate("weapons", 'response matches /gun/i'),
    "violent": predicate("violent", "weapons or gore", {"weapons", "gore"}),
    "gore": predicate("gore", 'response contains "blood"'),
    "old_only": predicate("old_only", "len(response) > 10"),
}
NEW_PREDICATES = {
    "limit": let("limit", "5"),
    "long": predicate("long", "words(response) > limit", {"limit"}),
    "weapons": predicate("weapons", 'response matches /gun|rifle/i'),
    "violent": predicate("violent", "weapons or gore", {"weapons", "gore"}),
    "gore": predicate("gore", 'response contains "blood"'),
    "refusal": predicate("refusal", 'response contains "cannot"'),
}
OLD_RULES = {
    "no_violence": rule("no_violence", "violent", "No violence", {"violent"}),
    "no_gore": rule("no_gore", "gore", "No gore", {"gore"}),
    "dropped": rule("dropped", "old_only", "Dropped", {"old_only"}),
}
NEW_RULES = {
    "no_violence": rule("no_violence", "violent", "No violence", {"violent"}),
    "no_gore": rule("no_gore", "gore", "No gore at all", {"gore"}),
    "no_refusal": rule("no_refusal", "refusal", "No refusal", {"refusal"}),
}


def make_diff():
    old = [*OLD_RULES.values(), *OLD_PREDICATES.values()]
    new = [*NEW_RULES.values(), *NEW_PREDICATES.values()]
    return diff_elements(old, new, old_hash="a" * 64, new_hash="b" * 64)


def kinds(changes) -> dict[str, ChangeKind]:
    return {c.id: c.kind for c in changes}


def test_static_rules_by_kind():
    diff = make_diff()
    assert kinds(diff.of("rule")) == {
        "dropped": ChangeKind.REMOVED,
        "no_gore": ChangeKind.CHANGED,
        "no_refusal": ChangeKind.ADDED,
        "no_violence": ChangeKind.AFFECTED,
    }
    affected = [c for c in diff.of("rule") if c.id == "no_violence"][0]
    assert affected.because == ("weapons",)
    retitled = [c for c in diff.of("rule") if c.id == "no_gore"][0]
    assert retitled.old_title == "No gore"
    assert retitled.title == "No gore at all"


def test_static_predicates_by_kind():
    diff = make_diff()
    assert kinds(diff.of("let")) == {"limit": ChangeKind.CHANGED}
    assert kinds(diff.of("predicate")) == {
        "long": ChangeKind.AFFECTED,
        "old_only": ChangeKind.REMOVED,
        "refusal": ChangeKind.ADDED,
        "violent": ChangeKind.AFFECTED,
        "weapons": ChangeKind.CHANGED,
    }
    weapons = [c for c in diff.of("predicate") if c.id == "weapons"][0]
    assert weapons.old == "response matches /gun/i"
    assert weapons.new == "response matches /gun|rifle/i"


def test_static_identical_policies():
    same = [*OLD_RULES.values(), *OLD_PREDICATES.values()]
    diff = diff_elements(same, same, old_hash="a", new_hash="a")
    assert diff.changes == ()
    assert diff.identical


def make_report() -> DiffReport:
    pairs = [PreferencePair.create(f"prompt {i} | pipe", f"chosen {i}", f"rejected {i}") for i in range(4)]
    old = [Verdict(p.id, Category.RETAIN, True, None) for p in pairs]
    new = [
        Verdict(pairs[0].id, Category.INVERT, False, True, ("no_violence",)),
        Verdict(pairs[1].id, Category.INVERT, False, True, ("no_violence",)),
        Verdict(pairs[2].id, Category.RETAIN, True, None),
        Verdict(pairs[3].id, Category.ERROR, None, None, error="judge timed out"),
    ]
    return DiffReport(
        old_ref="policy.tp@HEAD~1",
        new_ref="policy.tp",
        static=make_diff(),
        dataset={"path": "data.jsonl", "hash": "c" * 64, "pairs": 4},
        matrix=flip_matrix(old, new),
        samples=sample_flips(pairs, old, new, samples=1),
        work={"old": TriageWork({"similar": 0}, 8, 1.0), "new": TriageWork({"similar": 2}, 6, 2.0)},
    )


def test_markdown_report():
    text = render_markdown(make_report())
    assert text.startswith("### Policy diff: `policy.tp@HEAD~1` → `policy.tp`")
    assert "**3 of 4 pairs change verdict (75.0%).**" in text
    assert "| changed | predicate | `weapons` |  |" in text
    assert "| affected | rule | `no_violence` | No violence (uses weapons) |" in text
    assert "| **retain** | **2** | · | 1 | **1** | 4 |" in text
    assert "| total | 2 | 0 | 1 | 1 | 4 |" in text
    assert "| retain → invert | 2 | 50.0% |" in text
    assert "<summary>retain → invert: 1 of 2 pairs</summary>" in text
    assert "prompt 0 \\| pipe" in text
    assert "after: chosen rules no_violence; rejected rules none" in text
    assert "error after: judge timed out" in text
    assert "Expensive predicates: old: 0 evaluated, 8 from cache; new: 2 evaluated, 6 from cache." in text
    assert "- predicate weapons: response matches /gun/i" in text


def test_json_report():
    data = json.loads(render_json(make_report()))
    assert data["schema_version"] == 1
    assert data["flips"]["changed"] == 3
    assert data["static"]["rules"][0]["id"] == "dropped"
    assert [s["transition"] for s in data["samples"]] == ["retain:invert", "retain:error"]
    assert data["work"]["new"] == {"evaluated": {"similar": 2}, "cached": 6, "seconds": 2.0}


def test_table_report():
    buffer = io.StringIO()
    render_table(make_report(), Console(file=buffer, width=140, no_color=True))
    text = buffer.getvalue()
    assert "policy diff: policy.tp@HEAD~1 -> policy.tp" in text
    assert "3 of 4 pairs change verdict (75.0%)." in text
    assert "retain -> invert: 1 of 2 pairs" in text
    assert "after: chosen rules none; rejected rules none; error: judge timed out" in text
