"""Run the `trace` application in-process, as the CLI tests do."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from trace_dsl.cli.main import app

runner = CliRunner()


def invoke(args: list[str]) -> Result:
    """Run `trace ARGS` and return the result; fail the test if a traceback was printed."""
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result
