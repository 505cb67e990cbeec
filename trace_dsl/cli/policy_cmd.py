"""Policy commands: `trace check`, `trace fmt`, `trace test`, `trace triage` and `trace explain`.

Results go to stdout (diagnostics of `check`, summaries, reports); progress bars and notes go to
stderr. Every command exits with 1 when it finds an error or a failure.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from trace_dsl.cli.common import check_output_path, handle_errors, is_terminal, stderr, stdout

SCHEMA_VERSION = 1
_PIPE_WIDTH = 200


class ReportFormat(str, Enum):
    """Output format of a report."""

    table = "table"
    json = "json"


class TestFormat(str, Enum):
    """Output format of `trace test`."""

    table = "table"
    json = "json"
    junit = "junit"


class TriageFormat(str, Enum):
    """File format of `trace triage` output."""

    jsonl = "jsonl"
    parquet = "parquet"


def _print(renderable: Any) -> None:
    # A pipe or a file gets whole lines for grep and scripts; a terminal gets tables fitted to it.
    if stdout.is_terminal:
        stdout.print(renderable)
    else:
        Console(width=_PIPE_WIDTH, no_color=True, highlight=False).print(renderable)


def _print_text(text: str) -> None:
    stdout.print(text, markup=False, highlight=False, soft_wrap=True)


def _load_data(data: str, data_format: Optional[str], skip_invalid: bool, limit: Optional[int] = None):
    from trace_dsl.data.loader import load_pairs

    result = load_pairs(data, format=data_format, skip_invalid=skip_invalid, limit=limit)
    if result.skipped:
        stderr.print(f"note: {result.summary()}", markup=False, highlight=False, soft_wrap=True)
    return result.pairs


def _open_cache(policy, cache_path: Optional[Path], no_cache: bool):
    """Open the result cache for a policy's expensive predicates (`None` when it has none or with --no-cache)."""
    if no_cache or not policy.models:
        return None
    from trace_dsl.triage.cache import ResultCache, default_cache_path

    return ResultCache(cache_path or default_cache_path())


# ---- trace check ------------------------------------------------------------------------------------


def check_command(
    files: List[Path] = typer.Argument(..., help="Policy files (.tp) to check."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Preference data whose metadata fields the policy must match."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Row format of --data; detected when omitted."),
    output: ReportFormat = typer.Option(ReportFormat.table, "--format", help="Diagnostics as text (table) or JSON."),
) -> None:
    """Parse, resolve names and imports, and type-check policy files; report every error."""
    from trace_dsl.lang.checker import check_policy, infer_schema

    schema = None
    if data is not None:
        schema = infer_schema(_load_data(data, data_format, skip_invalid=True, limit=1000))
    reports = []
    errors = 0
    for file in files:
        result = check_policy(str(file), schema=schema)
        errors += sum(1 for d in result.diagnostics if d.severity == "error")
        reports.append((file, result))

    if output is ReportFormat.json:
        payload = {
            "schema_version": SCHEMA_VERSION,
            "files": [
                {"path": str(file), "ok": result.ok, "diagnostics": [d.to_dict() for d in result.diagnostics]}
                for file, result in reports
            ],
        }
        _print_text(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for file, result in reports:
            for diagnostic in result.diagnostics:
                _print_text(diagnostic.render(result.sources.get(diagnostic.path)))
            if result.ok:
                _print_text(f"{file}: ok")
        if errors:
            stderr.print(f"{errors} error{'s' if errors != 1 else ''} in {len(files)} file(s)", markup=False, soft_wrap=True)
    if errors:
        raise typer.Exit(1)


# ---- trace fmt --------------------------------------------------------------------------------------------


def fmt_command(
    files: List[Path] = typer.Argument(..., help="Policy files (.tp) to format in place."),
    check: bool = typer.Option(False, "--check", help="Change nothing; list the files that are not formatted and exit 1 if any."),
) -> None:
    """Rewrite policy files in the canonical layout (comments are kept)."""
    from trace_dsl.lang.formatter import format_source
    from trace_dsl.lang.parser import ParseFailure

    failed = False
    for file in files:
        try:
            source = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _print_text(f"{file}: error[TP003]: cannot read the file: {exc}")
            failed = True
            continue
        try:
            formatted = format_source(source, str(file))
        except ParseFailure as failure:
            for diagnostic in failure.diagnostics:
                _print_text(diagnostic.render(source))
            failed = True
            continue
        if formatted == source:
            continue
        if check:
            _print_text(f"would reformat {file}")
            failed = True
        else:
            file.write_text(formatted, encoding="utf-8")
            _print_text(f"reformatted {file}")
    if failed:
        raise typer.Exit(1)


# ---- trace test ---------------------------------------------------------------------------------------------


def _test_table(report) -> None:
    table = Table(title=f"{report.path}", box=box.SIMPLE)
    for column in ("example", "line", "expected", "actual", "chosen rules", "result"):
        table.add_column(column)
    for result in report.results:
        expected = result.expected_category + (f" by {', '.join(result.expected_rules)}" if result.expected_rules else "")
        table.add_row(
            result.title,
            str(result.line),
            expected,
            result.verdict.category.value,
            ", ".join(result.verdict.chosen_rules) or "-",
            "pass" if result.passed else "FAIL",
        )
    _print(table)
    for result in report.failures:
        _print_text(f"{report.path}:{result.line}: example \"{result.title}\" failed: {result.message}")
    covered = sum(1 for count in report.coverage.values() if count)
    line = f"{len(report.results) - len(report.failures)}/{len(report.results)} examples passed; " \
           f"rules covered: {covered}/{len(report.coverage)}"
    uncovered = report.uncovered()
    if uncovered:
        line += f" (no example fires {', '.join(uncovered)})"
    _print_text(line)


def test_command(
    files: List[Path] = typer.Argument(..., help="Policy files whose example cases to run."),
    output: TestFormat = typer.Option(TestFormat.table, "--format", help="Report as a table, JSON or JUnit XML."),
    cache_path: Optional[Path] = typer.Option(None, "--cache", help="Result cache file for expensive predicates."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate expensive predicates without the result cache."),
) -> None:
    """Run each policy's example cases and report failures and rule coverage."""
    from trace_dsl.compiler.policy import load_policy
    from trace_dsl.errors import PolicyCheckError
    from trace_dsl.triage.examples import junit_xml, run_examples

    reports = []
    load_errors: dict[str, str] = {}
    failed = False
    for file in files:
        try:
            policy = load_policy(file)
        except PolicyCheckError as exc:
            stderr.print(exc.message, markup=False, highlight=False, soft_wrap=True)
            load_errors[str(file)] = exc.message
            failed = True
            continue
        cache = _open_cache(policy, cache_path, no_cache)
        try:
            report = run_examples(policy, cache=cache, progress=is_terminal())
        finally:
            if cache is not None:
                cache.close()
        failed = failed or not report.passed
        reports.append(report)

    if output is TestFormat.json:
        errors = [{"path": path, "message": message} for path, message in load_errors.items()]
        _print_text(json.dumps({"schema_version": SCHEMA_VERSION, "policies": [r.to_dict() for r in reports],
                                "errors": errors}, indent=2, ensure_ascii=False))
    elif output is TestFormat.junit:
        _print_text(junit_xml(reports, load_errors).rstrip("\n"))
    else:
        for report in reports:
            _test_table(report)
    if failed:
        raise typer.Exit(1)


# ---- trace triage --------------------------------------------------------------------------------------------


def _summary_table(counts: dict[str, int], total: int) -> Table:
    table = Table(box=box.SIMPLE)
    table.add_column("category")
    table.add_column("pairs", justify="right")
    table.add_column("share", justify="right")
    for category, count in counts.items():
        table.add_row(category, str(count), f"{100 * count / total:.1f}%" if total else "-")
    table.add_row("total", str(total), "100.0%" if total else "-")
    return table


@handle_errors
def triage_command(
    policy_path: Path = typer.Argument(..., metavar="POLICY", help="The policy file (.tp)."),
    data: str = typer.Option(..., "--data", "-d", help="Preference data: a .jsonl/.json/.parquet file (optionally .gz) or dataset id."),
    output: Path = typer.Option(..., "--output", "-o", help="Triage file to write (.jsonl or .parquet)."),
    file_format: Optional[TriageFormat] = typer.Option(None, "--format", help="Triage file format; from the extension of -o when omitted."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Row format of --data; detected when omitted."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed data rows and report them, instead of stopping."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Triage at most this many pairs."),
    cache_path: Optional[Path] = typer.Option(None, "--cache", help="Result cache file for expensive predicates (default: .trace-cache/results.sqlite or $TRACE_CACHE_DIR)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate expensive predicates without the result cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (with schema_version)."),
) -> None:
    """Triage every pair under a policy: write a verdict per pair and print counts per category."""
    from trace_dsl.compiler.policy import load_policy
    from trace_dsl.lang.checker import infer_schema
    from trace_dsl.triage.engine import summarize, triage
    from trace_dsl.triage.output import output_format, write_verdicts

    try:
        kind = output_format(output, file_format.value if file_format else None)
    except ValueError as exc:
        from trace_dsl.errors import TraceError

        raise TraceError(str(exc), hint="name the output .jsonl or .parquet, or pass --format") from None
    check_output_path(output, "triage file", inputs=[policy_path, data])
    pairs = _load_data(data, data_format, skip_invalid, limit)
    policy = load_policy(policy_path, schema=infer_schema(pairs))
    cache = _open_cache(policy, cache_path, no_cache)
    try:
        verdicts = triage(policy, pairs, cache=cache, progress=is_terminal())
    finally:
        if cache is not None:
            cache.close()
    write_verdicts(verdicts, output, kind)
    counts = summarize(verdicts)
    stderr.print(f"wrote {len(verdicts)} verdicts to {output}", markup=False, highlight=False, soft_wrap=True)
    first_error = next((verdict for verdict in verdicts if verdict.error), None)
    if first_error is not None:
        stderr.print(
            f"warning: {counts['error']} pairs have verdict 'error' (first, pair {first_error.pair_id}: "
            f"{first_error.error}); `trace explain --pair ID` shows each predicate",
            markup=False, highlight=False, soft_wrap=True,
        )
    if as_json:
        payload = {"schema_version": SCHEMA_VERSION, "policy": str(policy_path), "policy_hash": policy.hash,
                   "data": data, "output": str(output), "pairs": len(verdicts), "categories": counts}
        _print_text(json.dumps(payload, indent=2))
    else:
        _print_text(f"{policy.name} {policy.version} (policy hash {policy.hash[:12]}) on {data}")
        _print(_summary_table(counts, len(verdicts)))


# ---- trace explain ---------------------------------------------------------------------------------------------


def find_pair(pairs, ident: str):
    """Return the pair whose id is `ident`, else the one at 0-based row index `ident`.

    Raises:
        PairNotFoundError: neither matches.
    """
    from trace_dsl.errors import PairNotFoundError

    for pair in pairs:
        if pair.id == ident:
            return pair
    # isdigit alone admits "²" (which int() rejects) and other scripts' digits.
    if ident.isascii() and ident.isdigit() and int(ident) < len(pairs):
        return pairs[int(ident)]
    raise PairNotFoundError(
        f"no pair with id or row index '{ident}' among {len(pairs)} pairs",
        hint="use a pair_id from a triage file, or a 0-based row index",
    )


def _cell(value: Any) -> str:
    if value is None:
        return "?"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


def _predicate_cell(value) -> str:
    text = _cell(value.value)
    if value.score is not None and not isinstance(value.score, bool):
        text += f" ({value.score:.3f})"
    if value.error:
        text += f" error: {value.error}"
    if value.rationale:
        text += f"\n{value.rationale[:300]}"
    return text


def _explain_tables(explanation) -> None:
    pair = explanation.pair
    _print_text(f"pair {pair.id}" + (f" ({pair.source})" if pair.source else ""))
    _print_text(f"prompt: {pair.prompt[:300]}")
    predicates = Table(title="predicates", box=box.SIMPLE)
    for column in ("predicate", "kind", "chosen", "rejected"):
        predicates.add_column(column)
    for item in explanation.predicates:
        predicates.add_row(item.name, item.kind, _predicate_cell(item.chosen), _predicate_cell(item.rejected))
    _print(predicates)
    rules = Table(title="rules (when / unless -> fires)", box=box.SIMPLE)
    for column in ("rule", "title", "chosen", "rejected"):
        rules.add_column(column)
    for rule in explanation.rules:
        rules.add_row(
            rule.id,
            rule.title,
            f"{_cell(rule.chosen_when)} / {_cell(rule.chosen_unless)} -> {_cell(rule.chosen_fires)}",
            f"{_cell(rule.rejected_when)} / {_cell(rule.rejected_unless)} -> {_cell(rule.rejected_fires)}",
        )
    _print(rules)
    verdict = explanation.verdict
    line = (f"verdict: {verdict.category.value} (chosen complies: {_cell(verdict.chosen_complies)}, "
            f"rejected complies: {_cell(verdict.rejected_complies)})")
    if explanation.deciding_rules:
        line += f"; decided by {', '.join(explanation.deciding_rules)}"
    if verdict.error:
        line += f"; error: {verdict.error}"
    _print_text(line)


@handle_errors
def explain_command(
    policy_path: Path = typer.Argument(..., metavar="POLICY", help="The policy file (.tp)."),
    data: str = typer.Option(..., "--data", "-d", help="Preference data holding the pair."),
    pair_ident: str = typer.Option(..., "--pair", "-p", help="The pair's id, or its 0-based row index in the data."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Row format of --data; detected when omitted."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed data rows (row indexes then count kept pairs)."),
    cache_path: Optional[Path] = typer.Option(None, "--cache", help="Result cache file for expensive predicates."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate expensive predicates without the result cache."),
    output: ReportFormat = typer.Option(ReportFormat.table, "--format", help="Report as tables or JSON."),
) -> None:
    """Show every predicate and rule on one pair's chosen and rejected response, and the deciding rules."""
    from trace_dsl.compiler.policy import load_policy
    from trace_dsl.triage.explain import explain

    pairs = _load_data(data, data_format, skip_invalid)
    pair = find_pair(pairs, pair_ident)
    policy = load_policy(policy_path)
    cache = _open_cache(policy, cache_path, no_cache)
    try:
        explanation = explain(policy, pair, cache=cache, progress=is_terminal())
    finally:
        if cache is not None:
            cache.close()
    if output is ReportFormat.json:
        _print_text(json.dumps(explanation.to_dict(), indent=2, ensure_ascii=False))
    else:
        _explain_tables(explanation)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `trace` application."""
    app.command("check")(handle_errors(check_command))
    app.command("fmt")(handle_errors(fmt_command))
    app.command("test")(handle_errors(test_command))
    app.command("triage")(triage_command)
    app.command("explain")(explain_command)
