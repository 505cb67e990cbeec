"""Every shipped policy passes `trace check`, `trace fmt --check` and `trace test`, and the
PKU-SafeRLHF policy sorts the bundled example into all three categories."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from trace_dsl.cli.main import app
from trace_dsl.compiler.policy import load_policy
from trace_dsl.data.loader import load_pairs
from trace_dsl.lang.checker import check_policy, infer_schema
from trace_dsl.triage.engine import summarize, triage
from trace_dsl.triage.examples import run_examples

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "policies").glob("*.tp"))
SHARED = sorted((ROOT / "policies" / "shared").glob("*.tp"))
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"
HH_DATA = ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz"

runner = CliRunner()


def test_shipped_policies_present():
    assert [p.name for p in POLICIES] == ["hh_clear_refusals.tp", "pku_context_aware.tp"]
    assert [p.name for p in SHARED] == ["refusals.tp"]


@pytest.mark.parametrize("path", POLICIES + SHARED, ids=lambda p: p.name)
def test_trace_check_passes(path):
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": ok")


@pytest.mark.parametrize("path", POLICIES + SHARED, ids=lambda p: p.name)
def test_trace_fmt_check_passes(path):
    result = runner.invoke(app, ["fmt", "--check", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_trace_test_passes(path):
    result = runner.invoke(app, ["test", str(path)])
    assert result.exit_code == 0, result.output
    report = run_examples(load_policy(path))
    assert report.passed
    assert report.uncovered() == []
    assert len(report.results) >= 6


def test_pku_policy_matches_dataset_fields():
    pairs = load_pairs(PKU_DATA).pairs
    result = check_policy(str(ROOT / "policies" / "pku_context_aware.tp"), schema=infer_schema(pairs))
    assert result.ok, [d.headline() for d in result.diagnostics]


def test_pku_policy_uses_all_categories():
    pairs = load_pairs(PKU_DATA).pairs
    counts = summarize(triage(load_policy(ROOT / "policies" / "pku_context_aware.tp"), pairs, progress=False))
    assert len(pairs) == 300
    assert counts["error"] == 0
    assert min(counts["invert"], counts["suppress"], counts["retain"]) > 0


def test_hh_policy_uses_all_categories():
    pairs = load_pairs(HH_DATA, skip_invalid=True).pairs
    counts = summarize(triage(load_policy(ROOT / "policies" / "hh_clear_refusals.tp"), pairs, progress=False))
    assert counts["error"] == 0
    assert min(counts["invert"], counts["suppress"], counts["retain"]) > 0


def _code_blocks(path: Path) -> list[str]:
    blocks, current, inside = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current) + "\n")
                current = []
            inside = not inside
        elif inside:
            current.append(line)
    return blocks


def test_readme_language_example_checks(tmp_path):
    blocks = _code_blocks(ROOT / "policies" / "README.md")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "refusals.tp").write_text((ROOT / "policies" / "shared" / "refusals.tp").read_text())
    (tmp_path / "policy.tp").write_text(blocks[1])
    assert runner.invoke(app, ["check", str(tmp_path / "policy.tp")]).exit_code == 0
    assert runner.invoke(app, ["test", str(tmp_path / "policy.tp")]).exit_code == 0


def test_readme_model_calls_check(tmp_path):
    blocks = _code_blocks(ROOT / "policies" / "README.md")
    path = tmp_path / "models.tp"
    path.write_text(blocks[2])
    result = check_policy(str(path))
    # Only the plugin, which no installed package provides, is reported.
    assert [(d.code, d.line) for d in result.diagnostics] == [("TP107", 5)]
    assert "my_org.pii" in result.diagnostics[0].message
