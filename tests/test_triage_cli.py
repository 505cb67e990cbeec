"""The policy commands through the CLI: exit codes, output formats, and no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trace_dsl.cli.main import app
from trace_dsl.triage.output import read_verdicts

ROOT = Path(__file__).resolve().parent.parent
PKU_POLICY = ROOT / "policies" / "pku_context_aware.tp"
PKU_DATA = ROOT / "examples" / "pku-saferlhf" / "pairs.jsonl"

runner = CliRunner()

BROKEN = '''policy "broken" version "1"
let critical = ["Violence"]
predicate harmful = response.harm_categories has_any critcal
predicate bad = response matches /(unclosed/
rule C1 "Critical": violates when harmful
rule C1 "Again": violates when bad
'''


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture()
def broken(tmp_path):
    path = tmp_path / "broken.tp"
    path.write_text(BROKEN, encoding="utf-8")
    return path


def test_check_reports_every_error(broken):
    result = invoke("check", str(broken))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    headlines = [line for line in lines if ": error[" in line]
    assert headlines == [
        f"{broken}:3:54: error[TP101]: unknown name `critcal`",
        f"{broken}:4:35: error[TP105]: invalid regular expression: missing ), unterminated subpattern",
        f"{broken}:6:1: error[TP103]: rule id `C1` is already used at line 5",
    ]
    first = lines.index(headlines[0])
    assert lines[first + 1].endswith("predicate harmful = response.harm_categories has_any critcal")
    assert lines[first + 2].endswith("^" * len("critcal"))
    assert lines[first + 3] == "hint: did you mean `critical`?"


def test_check_json(broken):
    result = invoke("check", "--format", "json", str(broken), str(PKU_POLICY))
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["schema_version"] == 1
    assert [f["ok"] for f in payload["files"]] == [False, True]
    assert [d["code"] for d in payload["files"][0]["diagnostics"]] == ["TP101", "TP105", "TP103"]


def test_check_against_data(tmp_path):
    path = tmp_path / "fields.tp"
    path.write_text('policy "f" version "1"\nrule R1 "t": violates when response.severity >= 2\n')
    result = invoke("check", str(path), "--data", str(PKU_DATA))
    assert result.exit_code == 1
    assert "error[TP120]: field `response.severity` is not in the dataset" in result.stdout
    assert "did you mean `severity_level`?" in result.stdout


def test_check_syntax_error(tmp_path):
    path = tmp_path / "syntax.tp"
    path.write_text('rule R1 "t" violates when x\n')
    result = invoke("check", str(path))
    assert result.exit_code == 1
    assert f"{path}:1:13: error[TP001]: unexpected `violates`" in result.stdout


def test_check_missing_file(tmp_path):
    result = invoke("check", str(tmp_path / "missing.tp"))
    assert result.exit_code == 1
    assert "error[TP003]" in result.stdout


def test_fmt_rewrites_and_checks(tmp_path):
    path = tmp_path / "messy.tp"
    path.write_text('policy "m" version "1"\nrule R1 "t":   violates when response contains "x"  # why\n')
    assert invoke("fmt", "--check", str(path)).exit_code == 1
    result = invoke("fmt", str(path))
    assert result.exit_code == 0
    assert result.stdout.strip() == f"reformatted {path}"
    assert path.read_text() == 'policy "m" version "1"\n\nrule R1 "t":\n  violates when response contains "x"  # why\n'
    assert invoke("fmt", "--check", str(path)).exit_code == 0


def test_fmt_syntax_error(tmp_path):
    path = tmp_path / "bad.tp"
    path.write_text("let x =\n")
    result = invoke("fmt", str(path))
    assert result.exit_code == 1
    assert "error[TP001]" in result.stdout
    assert path.read_text() == "let x =\n"


def test_test_command_formats(tmp_path):
    path = tmp_path / "failing.tp"
    path.write_text('policy "f" version "1"\nrule R1 "t": violates when response contains "x"\n'
                    'example "wrong" {\n  prompt "p"\n  chosen "x"\n  rejected "y"\n  expect retain\n}\n')
    table = invoke("test", str(path))
    assert table.exit_code == 1
    assert f'{path}:3: example "wrong" failed: expected retain, got invert' in table.stdout
    assert "0/1 examples passed; rules covered: 1/1" in table.stdout
    payload = json.loads(invoke("test", "--format", "json", str(path)).stdout)
    assert payload["policies"][0]["examples"][0]["actual"]["chosen_rules"] == ["R1"]
    junit = invoke("test", "--format", "junit", str(path)).stdout
    assert junit.startswith("<?xml") and 'failures="1"' in junit


def test_test_command_on_broken_policy(broken):
    result = invoke("test", str(broken))
    assert result.exit_code == 1
    assert "3 errors in the policy" in result.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_triage_writes_verdicts(tmp_path, suffix):
    output = tmp_path / f"triage{suffix}"
    result = invoke("triage", str(PKU_POLICY), "--data", str(PKU_DATA), "-o", str(output), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    verdicts = read_verdicts(output)
    assert summary["pairs"] == len(verdicts) == 300
    assert sum(summary["categories"].values()) == 300
    assert {v.policy_hash for v in verdicts} == {summary["policy_hash"]}


def test_triage_table_and_limit(tmp_path):
    result = invoke("triage", str(PKU_POLICY), "-d", str(PKU_DATA), "-o", str(tmp_path / "t.jsonl"), "--limit", "20")
    assert result.exit_code == 0
    assert "invert" in result.stdout and "total" in result.stdout
    assert "wrote 20 verdicts" in result.stderr


def test_triage_bad_inputs(tmp_path):
    missing = invoke("triage", str(PKU_POLICY), "-d", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "t.jsonl"))
    assert missing.exit_code == 1
    assert "error[TD002]" in missing.stderr
    wrong = invoke("triage", str(PKU_POLICY), "-d", str(PKU_DATA), "-o", str(tmp_path / "t.csv"))
    assert wrong.exit_code == 1
    assert "cannot tell the triage format" in wrong.stderr


def test_explain_by_index_and_id(tmp_path):
    by_index = invoke("explain", str(PKU_POLICY), "--data", str(PKU_DATA), "--pair", "0", "--format", "json")
    assert by_index.exit_code == 0, by_index.output
    payload = json.loads(by_index.stdout)
    assert {p["name"] for p in payload["predicates"]} >= {"refusal", "educational_request"}
    assert len(payload["rules"]) == 9
    by_id = invoke("explain", str(PKU_POLICY), "--data", str(PKU_DATA), "--pair", payload["pair_id"])
    assert by_id.exit_code == 0
    assert f"pair {payload['pair_id']}" in by_id.stdout
    assert f"verdict: {payload['verdict']['category']}" in by_id.stdout


def test_explain_unknown_pair():
    result = invoke("explain", str(PKU_POLICY), "--data", str(PKU_DATA), "--pair", "no-such-pair")
    assert result.exit_code == 1
    assert "error[TD010]: no pair with id or row index 'no-such-pair' among 300 pairs" in result.stderr
