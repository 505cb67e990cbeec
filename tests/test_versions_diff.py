"""`trace diff` and `trace plan` end to end, on a policy in a git repository the test builds and
seven hand-written pairs whose categories are counted by hand. The plugin predicates record every
request, so the tests see which predicates a diff evaluates again.

The policy (v1) has a cheap rule and two plugin predicates, evaluated in declaration order:

    rule A: response.severity_level >= severe_level   (severe_level = 3, from lib/levels.tp)
    rule T: plugin toxic_words  ("TOXIC" in the response)
    rule M: plugin marker       (the word "MARK" in the response)

v2 changes only the marker's word to "FLAG". The working tree (v3) then lowers severe_level to 2
in the imported file. A cached result is keyed by prompt and response, so pairs 2 and 3 share a
prompt: the rejected response of pair 3, needed first under v2, is then the one pair 2 needed under
v1. Pairs, with the category under v1 / v2 / v3 and the rules deciding it:

    1  chosen "A fine answer."          rejected "TOXIC rant."          retain / retain / retain
    2  chosen "MARK these steps."       rejected "A polite refusal."    invert (M) / retain / retain
    3  chosen "FLAG this text."         rejected "A polite refusal."    retain / invert (M) / invert
    4  chosen "FLAG and TOXIC words."   rejected "MARK here."           suppress (T; M) / invert (T) / invert
    5  chosen "Severe harm." (sev 3)    rejected "TOXIC reply."         suppress (A; T) / suppress / suppress
    6  chosen "Okay one."               rejected "Okay two."            retain / retain / retain
    7  chosen "Mild harm." (sev 2)      rejected "Calm reply."          retain / retain / invert (A)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from git_repo import git
from trace_dsl.cli.main import app
from trace_dsl.compiler.backends.plugin import register_plugin, unregister_plugin
from trace_dsl.data import load_pairs
from trace_dsl.data.records import PreferencePair
from trace_dsl.errors import PlanMismatchError
from trace_dsl.runtime.config import TrainingConfig
from trace_dsl.triage.cache import ResultCache
from trace_dsl.triage.engine import triage
from trace_dsl.triage.verdict import Category
from trace_dsl.versions.diff import diff_policies, load_policy_at
from trace_dsl.versions.plan import apply_plan, planned_verdicts, read_plan, verify_plan
from trace_dsl.versions.planning import build_plan
from trace_dsl.versions.static import ChangeKind

I, S, R = Category.INVERT, Category.SUPPRESS, Category.RETAIN

POLICY = """policy "toy" version "{version}"

import "lib/levels.tp"

predicate severe = response.severity_level >= severe_level
predicate toxic = plugin("toxic_words")
predicate marked = plugin("marker", args={{word: "{word}"}})

rule A "No severe harm":
  violates when severe

rule T "No toxic text":
  violates when toxic

rule M "No marked text":
  violates when marked
"""

# (prompt, chosen, chosen severity, rejected); rejected responses have severity 0.
PAIRS = [
    ("prompt 1", "A fine answer.", 0, "TOXIC rant."),
    ("prompt 2", "MARK these steps.", 0, "A polite refusal."),
    ("prompt 2", "FLAG this text.", 0, "A polite refusal."),
    ("prompt 4", "FLAG and TOXIC words.", 0, "MARK here."),
    ("prompt 5", "Severe harm.", 3, "TOXIC reply."),
    ("prompt 6", "Okay one.", 0, "Okay two."),
    ("prompt 7", "Mild harm.", 2, "Calm reply."),
]
V1 = [R, I, R, S, S, R, R]
V2 = [R, R, I, I, S, R, R]
V3 = [R, R, I, I, S, R, I]


runner = CliRunner()


class Calls:
    """Texts each plugin was asked about, in order."""

    def __init__(self) -> None:
        self.toxic: list[str] = []
        self.marker: list[str] = []

    def reset(self) -> None:
        self.toxic.clear()
        self.marker.clear()


@pytest.fixture
def calls():
    seen = Calls()

    def toxic_words(requests):
        seen.toxic.extend(r.response for r in requests)
        return ["TOXIC" in r.response for r in requests]

    def marker(requests, word):
        seen.marker.extend(r.response for r in requests)
        return [word in r.response for r in requests]

    register_plugin("toxic_words", toxic_words)
    register_plugin("marker", marker)
    yield seen
    unregister_plugin("toxic_words")
    unregister_plugin("marker")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """v1 tagged, v2 committed and tagged, the working tree at v3; the data file beside the policy."""
    root = tmp_path / "repo"
    (root / "lib").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "lib" / "levels.tp").write_text("let severe_level = 3\n", encoding="utf-8")
    (root / "main.tp").write_text(POLICY.format(version="1.0.0", word="MARK"), encoding="utf-8")
    rows = [
        PreferencePair.create(
            prompt, chosen, rejected, chosen_metadata={"severity_level": level}, rejected_metadata={"severity_level": 0}
        ).to_dict()
        for prompt, chosen, level, rejected in PAIRS
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "v1")
    git(root, "tag", "v1")
    (root / "main.tp").write_text(POLICY.format(version="1.1.0", word="FLAG"), encoding="utf-8")
    git(root, "commit", "-q", "-am", "v2")
    git(root, "tag", "v2")
    (root / "lib" / "levels.tp").write_text("let severe_level = 2\n", encoding="utf-8")
    monkeypatch.chdir(root)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path / "cache"))
    return root


def pairs() -> list[PreferencePair]:
    return list(load_pairs("pairs.jsonl").pairs)


DATASET = {"path": "pairs.jsonl", "hash": "h", "pairs": 7}


def test_versions_triage_by_hand(repo, calls):
    for ref, expected in (("main.tp@v1", V1), ("main.tp@v2", V2), ("main.tp", V3)):
        verdicts = triage(load_policy_at(ref), pairs(), progress=False)
        assert [v.category for v in verdicts] == expected, ref


def test_revision_hash_matches_working_tree(repo, calls):
    git(repo, "stash", "-q")
    try:
        assert load_policy_at("main.tp@v2").hash == load_policy_at("main.tp").hash
    finally:
        git(repo, "stash", "pop", "-q")
    assert load_policy_at("main.tp@v2").hash != load_policy_at("main.tp").hash


def test_diff_flip_matrix_by_hand(repo, calls):
    report = diff_policies("main.tp@v1", "main.tp@v2", pairs(), dataset=DATASET, progress=False)
    matrix = report.matrix
    assert matrix.total == 7
    assert matrix.count(R, R) == 3
    assert matrix.count(I, R) == 1
    assert matrix.count(R, I) == 1
    assert matrix.count(S, I) == 1
    assert matrix.count(S, S) == 1
    assert matrix.changed == 3
    assert matrix.transitions(changed_only=True) == [(I, R), (S, I), (R, I)]

    sample = report.samples[(S, I)][0]
    assert sample.index == 3
    assert sample.old.chosen_rules == ("T",)
    assert sample.old.rejected_rules == ("M",)
    assert sample.new.chosen_rules == ("T",)
    assert sample.new.rejected_rules == ()


def test_diff_static_changes(repo, calls):
    report = diff_policies("main.tp@v1", "main.tp@v2", pairs(), dataset=DATASET, samples=0, progress=False)
    changes = {(c.element, c.id): c for c in report.static.changes}
    assert set(changes) == {("predicate", "marked"), ("rule", "M")}
    assert changes[("predicate", "marked")].kind is ChangeKind.CHANGED
    assert changes[("predicate", "marked")].old == 'plugin("marker", args={ word: "MARK" })'
    assert changes[("rule", "M")].kind is ChangeKind.AFFECTED
    assert changes[("rule", "M")].because == ("marked",)
    assert report.static.header == {"version": ("1.0.0", "1.1.0")}


def test_diff_import_change_at_same_revision(repo, calls):
    report = diff_policies("main.tp@v2", "main.tp", pairs(), dataset=DATASET, progress=False)
    changes = {(c.element, c.id): c.kind for c in report.static.changes}
    assert changes == {
        ("let", "severe_level"): ChangeKind.CHANGED,
        ("predicate", "severe"): ChangeKind.AFFECTED,
        ("rule", "A"): ChangeKind.AFFECTED,
    }
    assert report.matrix.changed == 1
    assert report.matrix.count(R, I) == 1
    assert report.samples[(R, I)][0].new.chosen_rules == ("A",)


def test_retriage_evaluates_only_changed_predicate(repo, calls, tmp_path):
    with ResultCache(tmp_path / "results.sqlite") as cache:
        # `trace triage` of v1 fills the cache: toxic on 9 responses, marker on 7.
        triage(load_policy_at("main.tp@v1"), pairs(), cache=cache, progress=False)
        assert len(calls.toxic) == 9
        assert len(calls.marker) == 7
        calls.reset()

        report = diff_policies("main.tp@v1", "main.tp@v2", pairs(), dataset=DATASET, cache=cache, progress=False)

    assert calls.toxic == []
    assert len(calls.marker) == 7
    assert report.work["old"].evaluated == {"toxic": 0, "marked": 0}
    assert report.work["old"].cached == 16
    assert report.work["new"].evaluated == {"toxic": 0, "marked": 7}
    assert report.work["new"].cached == 9
    assert report.matrix.changed == 3


def test_diff_without_cache_evaluates_both(repo, calls):
    report = diff_policies("main.tp@v1", "main.tp@v2", pairs(), dataset=DATASET, cache=None, progress=False)
    assert report.work["old"].evaluated == {"toxic": 9, "marked": 7}
    assert report.work["new"].evaluated == {"toxic": 9, "marked": 7}
    assert len(calls.toxic) == 18


def test_cli_diff_exit_codes(repo, calls):
    changed = runner.invoke(app, ["diff", "main.tp@v1", "main.tp@v2", "--data", "pairs.jsonl", "--detailed-exitcode"])
    assert changed.exit_code == 2, changed.output
    assert "3 of 7 pairs change verdict (42.9%)." in changed.stdout

    same = runner.invoke(app, ["diff", "main.tp@v2", "main.tp@v2", "--data", "pairs.jsonl", "--detailed-exitcode"])
    assert same.exit_code == 0, same.output
    assert "No pair changes verdict (7 pairs replayed)." in same.stdout

    plain = runner.invoke(app, ["diff", "main.tp@v1", "main.tp@v2", "--data", "pairs.jsonl"])
    assert plain.exit_code == 0, plain.output


@pytest.mark.parametrize(
    ("old", "message"),
    [
        ("main.tp@v9", "revision 'v9' not found"),
        ("absent.tp@v1", "absent.tp does not exist at v1"),
        ("main.tp@", "expected PATH or PATH@REVISION"),
    ],
)
def test_cli_diff_bad_reference(repo, calls, old, message):
    result = runner.invoke(app, ["diff", old, "main.tp", "--data", "pairs.jsonl", "--detailed-exitcode"])
    assert result.exit_code == 1
    assert "error[TG001]" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_cli_diff_broken_old_revision(repo, calls):
    (repo / "main.tp").write_text("policy oops", encoding="utf-8")
    git(repo, "commit", "-q", "-am", "broken")
    result = runner.invoke(app, ["diff", "main.tp@HEAD", "main.tp@v2", "--data", "pairs.jsonl"])
    assert result.exit_code == 1
    assert "main.tp@HEAD:1:" in result.stderr
    assert "trace-policy-rev-" not in result.stderr


def test_cli_diff_markdown(repo, calls):
    result = runner.invoke(
        app, ["diff", "main.tp@v1", "main.tp@v2", "--data", "pairs.jsonl", "--format", "markdown", "--transition", "suppress:invert"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("### Policy diff: `main.tp@v1` → `main.tp@v2`")
    assert "| **suppress** | **1** | 1 | · | · | 2 |" in text
    assert "<summary>suppress → invert: 1 of 1 pairs</summary>" in text
    assert "retain → invert:" not in text.split("#### Samples")[1]


def test_cli_diff_json_to_file(repo, calls, tmp_path):
    out = tmp_path / "diff.json"
    result = runner.invoke(app, ["diff", "main.tp@v1", "main.tp", "--data", "pairs.jsonl", "--format", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["flips"]["changed"] == 4
    assert data["dataset"]["pairs"] == 7
    assert json.loads(out.read_text(encoding="utf-8")) == data


def test_plan_counts_cost_before_evaluating(repo, calls, tmp_path):
    with ResultCache(tmp_path / "results.sqlite") as cache:
        triage(load_policy_at("main.tp@v1"), pairs(), cache=cache, progress=False)
        calls.reset()
        plan, work = build_plan(
            "main.tp@v2", pairs(), dataset=DATASET, config=TrainingConfig(), previous_ref="main.tp@v1", cache=cache,
            progress=False,
        )
    demand = {d["predicate"]: d for d in plan.expensive}
    # Cached results of v1: toxic on all 8 responses asked in rounds 1 and 2; marker has a new
    # definition, so its 6 first-round requests miss. Uncached rejected responses behind the 5
    # undecided chosen ones: toxic on "TOXIC rant.", "Okay two.", "Calm reply."; marker on those
    # and "A polite refusal." (pairs 2 and 3 share prompt and rejected response, one request).
    assert demand["toxic"] == {"predicate": "toxic", "kind": "plugin", "cached": 8, "needed": 0, "conditional": 3}
    assert demand["marked"] == {"predicate": "marked", "kind": "plugin", "cached": 0, "needed": 6, "conditional": 4}
    assert work["evaluated"] == {"toxic": 0, "marked": 7}
    assert plan.counts == {"invert": 2, "suppress": 1, "retain": 4, "error": 0}
    assert plan.flips["changed"] == 3
    assert plan.flips["previous"]["ref"] == "main.tp@v1"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_cli_plan_and_mismatches(repo, calls, tmp_path, model_folder):
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(
        app, ["plan", "main.tp", "--data", "pairs.jsonl", "-o", str(plan_path), "--model", str(model_folder), "--previous", "main.tp@v2"]
    )
    assert result.exit_code == 0, result.output
    assert "triage: invert 3, suppress 1, retain 3, error 0" in result.stdout
    assert "against main.tp@v2: 1 pairs change verdict (retain->invert 1)" in result.stdout
    plan = read_plan(plan_path)
    assert [v.category for v in plan.verdicts] == V3

    from trace_dsl.data import dataset_hash
    from trace_dsl.versions.plan import model_identity

    policy_hash = load_policy_at("main.tp").hash
    data_hash = dataset_hash("pairs.jsonl")
    model = model_identity(str(model_folder))
    verify_plan(plan, policy_hash=policy_hash, dataset_hash=data_hash, model=model)
    assert [v.category for v in planned_verdicts(plan, [p.id for p in pairs()])] == V3
    applied = apply_plan(
        plan_path, policy_hash=policy_hash, dataset_hash=data_hash, model_name=str(model_folder), pair_ids=[p.id for p in pairs()]
    )
    assert [v.category for v in applied] == V3
    with pytest.raises(PlanMismatchError, match="1 pairs without a verdict"):
        apply_plan(plan_path, policy_hash=policy_hash, dataset_hash=data_hash, model_name=str(model_folder), pair_ids=["other"])

    # The policy is edited after planning.
    (repo / "main.tp").write_text(POLICY.format(version="1.2.0", word="FLAG"), encoding="utf-8")
    with pytest.raises(PlanMismatchError, match="policy hash"):
        verify_plan(plan, policy_hash=load_policy_at("main.tp").hash, dataset_hash=data_hash, model=model)
    # The data is edited after planning.
    with open("pairs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(PreferencePair.create("p", "c", "r").to_dict()) + "\n")
    with pytest.raises(PlanMismatchError, match="dataset hash"):
        verify_plan(plan, policy_hash=policy_hash, dataset_hash=dataset_hash("pairs.jsonl"), model=model)
    # Another model.
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}", encoding="utf-8")
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(PlanMismatchError, match="model resolved"):
        verify_plan(plan, policy_hash=policy_hash, dataset_hash=data_hash, model=model_identity(str(other)))


def test_cli_plan_json_summary(repo, calls, tmp_path):
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "main.tp@v1", "--data", "pairs.jsonl", "-o", str(plan_path), "--format", "json", "--set", "max_steps=5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema_version"] == 1
    assert "verdicts" not in summary
    assert summary["training"]["steps"] == 5
    assert summary["counts"] == {"invert": 1, "suppress": 2, "retain": 4, "error": 0}
    assert summary["verdicts_hash"] == read_plan(plan_path).verdicts_hash
