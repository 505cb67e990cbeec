"""`trace data inspect` and `trace models`: what a data file contains, and where model names resolve."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from trace_dsl.cli.common import handle_errors, is_terminal, stderr, stdout

SCHEMA_VERSION = 1
_SKIP_EXAMPLES = 5
_PIPE_WIDTH = 200

data_app = typer.Typer(help="Inspect preference data.", no_args_is_help=True)


class OutputFormat(str, Enum):
    """Output format of a command's result."""

    table = "table"
    json = "json"


def _format_help() -> str:
    from trace_dsl.data.formats import FORMATS

    return "Row format, instead of detecting it from the first row: " + ", ".join(FORMATS) + "."


def _read_with_progress(reader) -> list:
    """Collect a `PairReader`, drawing a row counter on stderr when it is a terminal."""
    if not is_terminal():
        return list(reader)
    pairs = []
    columns = (SpinnerColumn(), TextColumn("reading {task.fields[source]}: {task.completed} pairs"), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("read", total=None, source=reader.source)
        for pair in reader:
            pairs.append(pair)
            progress.advance(task)
    return pairs


def _print_table(table: Table) -> None:
    # A pipe or file gets whole lines for grep and scripts; a terminal gets the table fitted to it.
    if stdout.is_terminal:
        stdout.print(table)
        return
    Console(width=_PIPE_WIDTH, no_color=True, highlight=False).print(table)


def _inspect_report(source: str, data_format: Optional[str], skip_invalid: bool, limit: Optional[int]) -> dict[str, Any]:
    from trace_dsl.data import PairReader, dataset_hash
    from trace_dsl.data.inspect import summarise_metadata
    from trace_dsl.data.loader import LoadResult

    reader = PairReader(source, format=data_format, skip_invalid=skip_invalid, limit=limit)
    pairs = _read_with_progress(reader)
    result = LoadResult(source, reader.format or "unknown", tuple(pairs), reader.rows_read, tuple(reader.skipped))
    ids = [pair.id for pair in result.pairs]
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "format": result.format,
        "format_detected": data_format is None,
        "dataset_hash": dataset_hash(source, result.pairs),
        "rows": result.rows_read,
        "pairs": len(result.pairs),
        "multi_turn_pairs": sum(1 for pair in result.pairs if pair.history),
        "duplicate_pair_ids": len(ids) - len(set(ids)),
        "limit": limit,
        "skipped": len(result.skipped),
        "skipped_by_reason": result.skipped_by_reason(),
        "skipped_examples": [row.to_dict() for row in result.skipped[:_SKIP_EXAMPLES]],
        "fields": [summary.to_dict() for summary in summarise_metadata(result.pairs)],
    }


def _print_inspect_table(report: dict[str, Any]) -> None:
    how = "detected" if report["format_detected"] else "given"
    overview = [
        ("source", report["source"]),
        ("format", f"{report['format']} ({how})"),
        ("rows", str(report["rows"]) + (f" (stopped at --limit {report['limit']})" if report["limit"] else "")),
        ("pairs", str(report["pairs"])),
        ("multi-turn pairs", str(report["multi_turn_pairs"])),
        ("duplicate pair ids", str(report["duplicate_pair_ids"])),
        ("skipped rows", str(report["skipped"])),
        ("dataset hash", report["dataset_hash"]),
    ]
    width = max(len(label) for label, _ in overview)
    for label, value in overview:
        stdout.print(f"{label.ljust(width)}  {value}", markup=False, highlight=False)

    if report["skipped"]:
        stdout.print("\nskipped rows by reason:", markup=False)
        for code, count in report["skipped_by_reason"].items():
            stdout.print(f"  {count:>6}  {code}", markup=False, highlight=False)
        stdout.print(f"first {len(report['skipped_examples'])} skipped rows:", markup=False)
        for row in report["skipped_examples"]:
            field = f"field {row['field']!r}: " if row["field"] else ""
            stdout.print(f"  {row['location']}: {field}{row['reason']}", markup=False, highlight=False)

    if not report["fields"]:
        stdout.print("\nno metadata fields: policies can test the texts only", markup=False)
        return
    table = Table(title="metadata fields for policies", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("field", no_wrap=True)
    table.add_column("type")
    table.add_column("present", no_wrap=True)
    table.add_column("distinct", no_wrap=True)
    table.add_column("top values (count)", overflow="fold")
    for field in report["fields"]:
        top = ", ".join(f"{json.dumps(item['value'], ensure_ascii=False)} ({item['count']})" for item in field["top_values"])
        table.add_row(
            field["name"], " | ".join(field["types"]), f"{field['present']}/{field['total']}", str(field["distinct"]), top
        )
    stdout.print()
    _print_table(table)


@data_app.command("inspect")
@handle_errors
def inspect_command(
    source: str = typer.Argument(..., help="A .jsonl, .json or .parquet file (optionally .gz), or a dataset id org/name[:split]."),
    data_format: Optional[str] = typer.Option(None, "--format", "--data-format", help=_format_help()),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed rows and report them, instead of stopping at the first."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read at most this many pairs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (with schema_version)."),
) -> None:
    """Show a data file's format, row and pair counts, skipped rows and the metadata fields policies can use."""
    report = _inspect_report(source, data_format, skip_invalid, limit)
    if as_json:
        stdout.print_json(json.dumps(report, ensure_ascii=False))
        return
    _print_inspect_table(report)


def _model_status(resolved) -> str:
    from trace_dsl.models.smollm2 import MARKER_FILE

    if resolved.kind == "packaged":
        if resolved.path is not None and (resolved.path / MARKER_FILE).is_file():
            return "converted"
        if resolved.weights_present:
            return "converts on first use"
        return f"missing package {resolved.packaged.replace('_', '-')}"
    if resolved.weights_present:
        return "present"
    return "not cached" if resolved.hf_id else "missing"


def _model_row(resolved) -> dict[str, Any]:
    row = resolved.to_dict()
    row["status"] = _model_status(resolved)
    return row


def models_command(
    name: Optional[str] = typer.Argument(None, help="Resolve only this name (alias, folder or org/name[@revision])."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output as a table or as JSON."),
) -> None:
    """List the model aliases, what each resolves to, and whether its weights are on this machine."""
    from trace_dsl.models import cache_dir, list_aliases, resolve_model
    from trace_dsl.models.resolve import user_alias_files

    resolved_models = [resolve_model(name, require_weights=False)] if name else list_aliases()
    rows = [_model_row(resolved) for resolved in resolved_models]
    if output is OutputFormat.json:
        stdout.print_json(json.dumps({"schema_version": SCHEMA_VERSION, "models": rows}))
        return

    # LoRA targets and alias sources are in the JSON output; the table keeps to what fits 80 columns.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "kind", "weights", "template"):
        table.add_column(column, no_wrap=True)
    table.add_column("resolves to", overflow="fold")
    for row in rows:
        targets = [target for target in (row["hf_id"], row["path"]) if target]
        table.add_row(row["name"], row["kind"], row["status"], row["chat_template"] or "-", "\n".join(targets))
    _print_table(table)
    user_files = ", ".join(str(path) for path in user_alias_files())
    stderr.print(f"user alias files (read when present): {user_files}", markup=False, highlight=False)
    stderr.print(f"model cache: {cache_dir() / 'models'}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `trace data ...` and `trace models` to the `trace` application."""
    app.add_typer(data_app, name="data")
    app.command("models")(handle_errors(models_command))

