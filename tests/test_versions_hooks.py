"""The pre-commit hooks in `.pre-commit-hooks.yaml`, run the way pre-commit runs them: the entry
command followed by the staged `.tp` file names."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trace_dsl.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
HOOKS = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
POLICIES = sorted((ROOT / "policies").glob("*.tp"))

runner = CliRunner()


def run_hook(hook_id: str, files: list[Path]):
    hook = next(h for h in HOOKS if h["id"] == hook_id)
    command = shlex.split(hook["entry"])
    assert command[0] == "trace"
    return runner.invoke(app, command[1:] + [str(f) for f in files])


def test_hooks_declared():
    assert [h["id"] for h in HOOKS] == ["trace-check", "trace-fmt"]
    for hook in HOOKS:
        assert re.search(hook["files"], "policies/main.tp")
        assert not re.search(hook["files"], "policies/main.tp.bak")
        assert hook["language"] == "system"


@pytest.mark.parametrize("hook_id", ["trace-check", "trace-fmt"])
def test_hooks_pass_shipped_policies(hook_id):
    result = run_hook(hook_id, POLICIES)
    assert result.exit_code == 0, result.output


def test_check_hook_fails_on_error(tmp_path):
    broken = tmp_path / "broken.tp"
    broken.write_text('policy "p" version "1"\nrule A "t": violates when unknown_name\n', encoding="utf-8")
    result = run_hook("trace-check", [broken])
    assert result.exit_code == 1
    assert "broken.tp:2:" in result.output


def test_fmt_hook_fails_on_layout(tmp_path):
    text = 'policy "p" version "1"\nrule A "t":   violates when response contains "x"\n'
    loose = tmp_path / "loose.tp"
    loose.write_text(text, encoding="utf-8")
    result = run_hook("trace-fmt", [loose])
    assert result.exit_code == 1
    assert "loose.tp" in result.output
    assert loose.read_text(encoding="utf-8") == text
