"""`trace apply --plan`: training takes the planned verdicts, and stops when the policy, the data
or the model no longer match the plan. Runs on a tiny random Llama and the HH-RLHF example."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trace_dsl.cli.main import app
from trace_dsl.runtime.rundir import read_json, read_jsonl
from trace_dsl.versions.plan import read_plan

ROOT = Path(__file__).resolve().parents[1]
HH_DATA = ROOT / "examples" / "hh-rlhf" / "harmless-test-head.jsonl.gz"
HH_POLICY = ROOT / "policies" / "hh_clear_refusals.tp"
LIMIT = "120"
TINY_SETTINGS = ["--set", "max_length=64", "--set", "lora.r=4", "--set", "impact.gold_batch_size=6", "--max-steps", "1"]

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the HH-RLHF policy (with its imports) and data, so the test can edit both."""
    shutil.copytree(HH_POLICY.parent, tmp_path / "policies")
    shutil.copy(HH_DATA, tmp_path / "data.jsonl.gz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TRACE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def make_plan(model_dir) -> Path:
    args = ["plan", "policies/hh_clear_refusals.tp", "--data", "data.jsonl.gz", "--limit", LIMIT, "-o", "plan.json", "--model", str(model_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return Path("plan.json")


def apply_args(model_dir, output: str, policy: str = "policies/hh_clear_refusals.tp") -> list[str]:
    return [
        "apply", policy, "--model", str(model_dir), "--data", "data.jsonl.gz", "--limit", LIMIT, "-o", output,
        "--plan", "plan.json", "--dry-run", "--skip-invalid", *TINY_SETTINGS,
    ]


def test_apply_trains_planned_verdicts(workspace, tiny_model_dir):
    plan = read_plan(make_plan(tiny_model_dir))
    result = runner.invoke(app, apply_args(tiny_model_dir, "run"))
    assert result.exit_code == 0, result.output
    triaged = list(read_jsonl(Path("run") / "triage.jsonl"))
    assert triaged == [verdict.to_dict() for verdict in plan.verdicts]
    manifest = read_json(Path("run") / "manifest.json")
    assert manifest["options"]["plan"] == str(workspace / "plan.json")
    assert manifest["policy"]["hash"] == plan.policy["hash"]


def test_apply_refuses_edited_policy(workspace, tiny_model_dir):
    make_plan(tiny_model_dir)
    policy = Path("policies/hh_clear_refusals.tp")
    policy.write_text(policy.read_text(encoding="utf-8") + "\n# reviewed later\n", encoding="utf-8")
    result = runner.invoke(app, apply_args(tiny_model_dir, "run"))
    assert result.exit_code == 1
    assert "error[TR010]" in result.stderr
    assert "policy hash: planned" in result.stderr
    assert "Traceback" not in result.output


def test_apply_refuses_other_model(workspace, tiny_model_dir, tmp_path):
    make_plan(tiny_model_dir)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    result = runner.invoke(app, apply_args(other, "run"))
    assert result.exit_code == 1
    assert "model resolved: planned" in result.stderr


def test_apply_refuses_edited_plan(workspace, tiny_model_dir):
    path = make_plan(tiny_model_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["verdicts"][0]["category"] = "invert" if data["verdicts"][0]["category"] != "invert" else "retain"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = runner.invoke(app, apply_args(tiny_model_dir, "run"))
    assert result.exit_code == 1
    assert "edited after `trace plan`" in result.stderr


def test_plan_and_apply_skip_invalid_rows(workspace, tiny_model_dir):
    # A data file with one malformed row: the plan must skip it as `trace apply --skip-invalid` does.
    import gzip

    rows = gzip.open("data.jsonl.gz", "rt", encoding="utf-8").read().splitlines()[: int(LIMIT)]
    rows.insert(3, json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}))
    Path("broken.jsonl").write_text("\n".join(rows) + "\n")
    args = ["plan", "policies/hh_clear_refusals.tp", "--data", "broken.jsonl", "-o", "plan.json", "--model", str(tiny_model_dir)]

    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    assert "--skip-invalid" in refused.output

    result = runner.invoke(app, [*args, "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 invalid rows" in result.output
    assert len(read_plan("plan.json").verdicts) == int(LIMIT)

    applied = runner.invoke(app, [
        "apply", "policies/hh_clear_refusals.tp", "--model", str(tiny_model_dir), "--data", "broken.jsonl", "-o", "run",
        "--plan", "plan.json", "--dry-run", "--skip-invalid", *TINY_SETTINGS,
    ])
    assert applied.exit_code == 0, applied.output
