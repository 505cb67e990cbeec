"""`trace diff` and `trace plan`: review a policy change over data, and fix what will be trained.

Both accept a policy as a file (`policy.tp`, the working tree) or as a file at a git revision
(`policy.tp@HEAD~1`, `policy.tp@v1.2`). Expensive-predicate results go through the shared result
cache, so a diff or plan after a triage re-evaluates only predicates whose definition changed.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from trace_dsl.cli.common import check_output_path, handle_errors, is_terminal, stderr, stdout

# `--detailed-exitcode` statuses, as `terraform plan` uses them.
EXIT_NO_CHANGES = 0
EXIT_CHANGES = 2


class DiffFormat(str, Enum):
    """Output format of `trace diff`."""

    table = "table"
    json = "json"
    markdown = "markdown"


class PlanFormat(str, Enum):
    """Output format of the `trace plan` summary."""

    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    """Add `diff` and `plan` to the `trace` application."""
    app.command("diff")(diff_command)
    app.command("plan")(plan_command)


def _load_data(data: str, data_format: Optional[str], limit: Optional[int], skip_invalid: bool) -> tuple[list, dict[str, Any]]:
    from trace_dsl.data import dataset_hash, load_pairs, pairs_hash
    from trace_dsl.errors import DatasetFormatError

    result = load_pairs(data, format=data_format, skip_invalid=skip_invalid, limit=limit)
    pairs = list(result.pairs)
    if not pairs:
        raise DatasetFormatError(f"{data}: no preference pairs were read", hint="check the file and --data-format")
    if result.skipped:
        stderr.print(f"skipped {len(result.skipped)} invalid rows of {data} (--skip-invalid)", markup=False)
    info = {
        "path": data,
        "format": result.format,
        "hash": dataset_hash(data, pairs),
        "pairs_hash": pairs_hash(pairs),
        "pairs": len(pairs),
        "limit": limit,
    }
    return pairs, info


def _open_cache(cache_path: Optional[Path], no_cache: bool) -> Any:
    from trace_dsl.triage.cache import ResultCache, default_cache_path

    if no_cache:
        return None
    return ResultCache(cache_path or default_cache_path())


@handle_errors
def diff_command(
    old: str = typer.Argument(..., help="The old policy: a .tp file, or FILE@REVISION read from git (policy.tp@HEAD~1)."),
    new: str = typer.Argument(..., help="The new policy: a .tp file (the working tree) or FILE@REVISION."),
    data: str = typer.Option(..., "--data", "-d", help="Preference data file or dataset id to replay both versions on."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Data format; detected from the rows when omitted."),
    output_format: DiffFormat = typer.Option(DiffFormat.table, "--format", help="Report format: table, json or markdown (for a pull-request comment)."),
    samples: int = typer.Option(3, "--samples", min=0, help="Sample pairs shown per verdict transition."),
    transition: Optional[str] = typer.Option(None, "--transition", help="Show samples of this transition only, OLD:NEW (retain:invert)."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode", help="Exit 0 when no verdict changes, 2 when some do, 1 on error."),
    cache_path: Optional[Path] = typer.Option(None, "--cache", help="Result cache file; default $TRACE_CACHE_DIR/results.sqlite or ./.trace-cache/results.sqlite."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate every expensive predicate of both versions, without the result cache."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Replay at most this many pairs."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed data rows instead of stopping."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the report to this file."),
) -> None:
    """Show which pairs change verdict between two policy versions, and why."""
    from trace_dsl.versions.diff import diff_policies
    from trace_dsl.versions.replay import parse_transition
    from trace_dsl.versions.report import render_json, render_markdown, render_table

    wanted = parse_transition(transition) if transition else None
    if output is not None:
        check_output_path(output, "report file", inputs=[old, new, data])
    pairs, info = _load_data(data, data_format, limit, skip_invalid)
    cache = _open_cache(cache_path, no_cache)
    try:
        report = diff_policies(
            old, new, pairs, dataset=info, cache=cache, samples=samples, transition=wanted, progress=is_terminal()
        )
    finally:
        if cache is not None:
            cache.close()

    if output_format is DiffFormat.table:
        render_table(report, stdout)
        text = None
    else:
        text = render_json(report) if output_format is DiffFormat.json else render_markdown(report)
        stdout.print(text, markup=False, highlight=False, end="" if text.endswith("\n") else "\n")
    if output is not None:
        if text is None:
            text = render_markdown(report)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        stderr.print(f"report written to {output}", markup=False, highlight=False)

    if detailed_exitcode:
        raise typer.Exit(EXIT_CHANGES if report.changed else EXIT_NO_CHANGES)


@handle_errors
def plan_command(
    policy: str = typer.Argument(..., help="The policy to plan: a .tp file, or FILE@REVISION read from git."),
    data: str = typer.Option(..., "--data", "-d", help="Preference data file or dataset id."),
    output: Path = typer.Option(..., "--output", "-o", help="Plan file to write (JSON)."),
    previous: Optional[str] = typer.Option(None, "--previous", help="A previous policy version (FILE or FILE@REVISION) to count verdict flips against."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model `trace apply` will train; recorded and checked by `trace apply --plan`."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Training settings, a JSON or YAML file (as for `trace apply`)."),
    settings: List[str] = typer.Option([], "--set", help="Override one training setting, key=value (dotted keys: lora.r=8). Repeatable."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Data format; detected from the rows when omitted."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Plan on at most this many pairs."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed data rows (each is counted) instead of stopping; pass it to `trace apply --plan` too."),
    cache_path: Optional[Path] = typer.Option(None, "--cache", help="Result cache file; default $TRACE_CACHE_DIR/results.sqlite or ./.trace-cache/results.sqlite."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate every expensive predicate without the result cache."),
    output_format: PlanFormat = typer.Option(PlanFormat.table, "--format", help="Summary format on stdout: table or json."),
) -> None:
    """Triage DATA with POLICY and write a plan: counts, flips, cost and training steps; trains nothing."""
    import json

    from trace_dsl.runtime.apply import load_config
    from trace_dsl.versions.plan import model_identity, write_plan
    from trace_dsl.versions.planning import build_plan, error_count

    config = load_config(config_file, settings)
    identity = model_identity(model) if model else None
    check_output_path(output, "plan file", inputs=[policy, data, *([previous] if previous else [])])
    pairs, info = _load_data(data, data_format, limit, skip_invalid)
    cache = _open_cache(cache_path, no_cache)
    try:
        plan, work = build_plan(
            policy, pairs, dataset=info, config=config, model=identity, previous_ref=previous, cache=cache,
            progress=is_terminal(),
        )
    finally:
        if cache is not None:
            cache.close()
    write_plan(plan, output)

    if output_format is PlanFormat.json:
        summary = plan.to_dict()
        summary.pop("verdicts")
        summary["plan_file"] = str(output)
        summary["work"] = work
        stdout.print(json.dumps(summary, indent=2, ensure_ascii=False), markup=False, highlight=False)
    else:
        for line in describe_plan(plan, work):
            stdout.print(line, markup=False, highlight=False)
        stdout.print(f"plan written to {output}; train it with `trace apply {policy} --plan {output} ...`", markup=False, highlight=False)
    errors = error_count(plan)
    if errors:
        stderr.print(
            f"warning: {errors} pairs have verdict 'error'; `trace apply` stops on them unless --drop-errors is given",
            markup=False,
            highlight=False,
        )


def describe_plan(plan: Any, work: dict[str, Any]) -> list[str]:
    """Return the lines of the plan summary `trace plan` prints."""
    counts = ", ".join(f"{name} {count}" for name, count in plan.counts.items())
    lines = [
        f"policy {plan.policy['ref']} (hash {plan.policy['hash'][:12]}), data {plan.dataset['path']} ({plan.dataset['pairs']} pairs)",
        f"triage: {counts}",
    ]
    if plan.flips is not None:
        flips = plan.flips
        moves = ", ".join(f"{t['old']}->{t['new']} {t['count']}" for t in flips["transitions"] if t["old"] != t["new"])
        lines.append(f"against {flips['previous']['ref']}: {flips['changed']} pairs change verdict" + (f" ({moves})" if moves else ""))
    if not plan.expensive:
        lines.append("expensive predicates: none, the policy has rules on metadata and text only")
    for demand in plan.expensive:
        line = f"predicate {demand['predicate']} ({demand['kind']}): {demand['needed']} to evaluate, {demand['cached']} cached"
        if demand["conditional"]:
            line += f", up to {demand['conditional']} more if uncached answers make chosen responses violate"
        lines.append(line)
    training = plan.training
    lines.append(
        f"training (estimate, one process): {training['train_pairs']} pairs ({training['heldout_pairs']} held out), "
        f"{training['steps']} optimiser steps"
    )
    if plan.model is not None:
        lines.append(f"model {plan.model['name']} -> {plan.model['resolved']}")
    line = f"triage took {work['seconds']:.1f} s"
    if plan.expensive:
        line += f"; expensive-predicate requests evaluated {sum(work['evaluated'].values())}, read from cache {work['cached']}"
    lines.append(line)
    return lines
