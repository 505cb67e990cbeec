"""`trace data inspect` and `trace models` through the real command line application."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trace_dsl.cli.main import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PKU_FILE = EXAMPLES / "pku-saferlhf" / "pairs.jsonl"
HH_FILE = EXAMPLES / "hh-rlhf" / "harmless-test-head.jsonl.gz"

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TRACE_MODEL_ALIASES", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


def _fields(report: dict) -> dict[str, dict]:
    return {field["name"]: field for field in report["fields"]}


def test_inspect_pku_json():
    result = runner.invoke(app, ["data", "inspect", str(PKU_FILE), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert report["format"] == "pku-saferlhf"
    assert report["format_detected"] is True
    assert (report["rows"], report["pairs"], report["skipped"]) == (300, 300, 0)
    fields = _fields(report)
    assert fields["response.harm_categories"]["types"] == ["array of string"]
    assert fields["response.harm_categories"]["total"] == 600
    assert fields["response.severity_level"]["distinct"] == 4
    assert fields["response.is_safe"]["top_values"] == [{"value": True, "count": 331}, {"value": False, "count": 269}]
    assert fields["pair.chosen_by"]["top_values"][0] == {"value": "safer_response_id", "count": 257}
    assert "pair.prompt_source" in fields


def test_inspect_pku_table():
    result = runner.invoke(app, ["data", "inspect", str(PKU_FILE)])
    assert result.exit_code == 0, result.output
    assert "pku-saferlhf (detected)" in result.stdout
    assert "response.harm_categories" in result.stdout
    assert "sha256:631d169af945a7a6" in result.stdout


def test_inspect_hh_stops_at_bad_row():
    result = runner.invoke(app, ["data", "inspect", str(HH_FILE)])
    assert result.exit_code == 1
    assert "error[TD001]" in result.stderr
    assert "harmless-test-head.jsonl.gz:1255" in result.stderr
    assert "--skip-invalid" in result.stderr
    assert "Traceback" not in result.output


def test_inspect_hh_skip_invalid():
    result = runner.invoke(app, ["data", "inspect", str(HH_FILE), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "skipped rows        1" in result.stdout
    assert "1  prompt-mismatch" in result.stdout
    assert ":1255: field 'rejected'" in result.stdout
    assert "no metadata fields" in result.stdout


def test_inspect_skip_invalid_json():
    result = runner.invoke(app, ["data", "inspect", str(HH_FILE), "--skip-invalid", "--json", "--limit", "5"])
    report = json.loads(result.stdout)
    assert report["pairs"] == 5
    assert report["limit"] == 5
    assert report["multi_turn_pairs"] >= 1
    assert report["fields"] == []


def test_inspect_forced_format(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}) + "\n")
    result = runner.invoke(app, ["data", "inspect", str(path), "--format", "implicit-prompt", "--json"])
    assert json.loads(result.stdout)["format"] == "implicit-prompt"


def test_inspect_unknown_format():
    result = runner.invoke(app, ["data", "inspect", str(PKU_FILE), "--format", "csv"])
    assert result.exit_code == 1
    assert "unknown data format 'csv'" in result.stderr


def test_inspect_missing_file():
    result = runner.invoke(app, ["data", "inspect", "missing.jsonl"])
    assert result.exit_code == 1
    assert "error[TD002]: missing.jsonl: no such file" in result.stderr


def test_models_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for alias in ("llama3", "llama3.1", "qwen2.5", "gemma2", "smollm2"):
        assert alias in result.stdout
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in result.stdout
    assert "not cached" in result.stdout


def test_models_json():
    result = runner.invoke(app, ["models", "--format", "json"])
    assert result.exit_code == 0, result.output
    models = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert models["qwen2.5"]["hf_id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert models["qwen2.5"]["status"] == "not cached"
    assert models["smollm2"]["kind"] == "packaged"
    assert models["smollm2"]["status"] in {"converted", "converts on first use"}
    assert models["gemma2"]["lora_target_modules"] == ["q_proj", "v_proj"]


def test_models_single_name(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["models", str(folder), "--format", "json"])
    row = json.loads(result.stdout)["models"][0]
    assert row["kind"] == "path"
    assert row["status"] == "present"


def test_models_unknown_name():
    result = runner.invoke(app, ["models", "gemma"])
    assert result.exit_code == 1
    assert "unknown model 'gemma'" in result.stderr
    assert "did you mean gemma2" in result.stderr
