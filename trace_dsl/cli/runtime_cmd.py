"""The runtime commands: `trace apply` (triage, impact scores, hybrid training) and `trace eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from trace_dsl.cli.common import handle_errors, is_terminal, stderr, stdout


def register(app: typer.Typer) -> None:
    """Add `apply` and `eval` to the `trace` application."""
    app.command("apply")(apply_command)
    app.command("eval")(eval_command)


def _command_line(context: typer.Context) -> tuple[str, ...]:
    """Rebuild the running command from its parsed parameters, with defaults left out.

    Rebuilt rather than read from `sys.argv`, which contains the host program's arguments when the
    command runs inside another program (tests, notebooks).
    """
    words = ["trace", context.info_name or ""]
    for parameter in context.command.params:
        value = context.params.get(parameter.name)
        if value is None or value is False or value == [] or value == ():
            continue
        if parameter.param_type_name == "argument":
            words.append(str(value))
            continue
        if parameter.default == value and not parameter.required:
            continue
        flag = max(parameter.opts, key=len)
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return tuple(words)


@handle_errors
def apply_command(
    context: typer.Context,
    policy: Path = typer.Argument(..., help="The new policy, a .tp file."),
    model: str = typer.Option(..., "--model", "-m", help="Model alias (see `trace models`), local folder or Hugging Face id."),
    data: str = typer.Option(..., "--data", "-d", help="Preference data file or dataset id."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory to write."),
    data_format: Optional[str] = typer.Option(None, "--data-format", "--format", help="Data format; detected from the rows when omitted."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Training settings, a JSON or YAML file."),
    settings: List[str] = typer.Option([], "--set", help="Override one setting, key=value (dotted keys: lora.r=8). Repeatable."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimiser steps."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read at most this many pairs."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed data rows (each is logged) instead of stopping."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the split, sampling and initialisation."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Stop after triage and impact scores; print what training would do."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    merge: bool = typer.Option(False, "--merge", help="Also save the adapter merged into the base model (merged/)."),
    drop_errors: bool = typer.Option(False, "--drop-errors", help="Train without pairs whose verdict is error instead of stopping."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Train exactly the verdicts of a plan from `trace plan`; stop if the policy, data or model no longer match it."),
) -> None:
    """Triage DATA with POLICY, score the conflicts and re-align MODEL with a LoRA adapter."""
    from trace_dsl.runtime.apply import ApplyRequest, apply_policy, describe_plan, format_duration, load_config

    overrides = list(settings)
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    config = load_config(config_file, overrides)
    if resume and (config_file is not None or overrides):
        _refuse_resume_changes(output, config_file, overrides)
    request = ApplyRequest(
        policy=policy,
        model=model,
        data=data,
        output=output,
        config=config,
        data_format=data_format,
        limit=limit,
        skip_invalid=skip_invalid,
        dry_run=dry_run,
        overwrite=overwrite,
        resume=resume,
        merge=merge,
        drop_errors=drop_errors,
        plan=plan,
        command_line=_command_line(context),
        progress=is_terminal(),
    )
    result = apply_policy(request, console=stderr)

    counts = ", ".join(f"{name} {count}" for name, count in result.counts.items())
    stdout.print(f"triage: {counts}", markup=False, highlight=False)
    if result.status == "dry-run":
        for line in describe_plan(result, request.config):
            stdout.print(line, markup=False, highlight=False)
        stdout.print(f"dry run: nothing trained; run directory {result.run.root}", markup=False, highlight=False)
        return
    steps = "1 step" if result.steps == 1 else f"{result.steps} steps"
    stdout.print(
        f"trained {steps} in {format_duration(result.seconds)}; adapter in {result.run.adapter}",
        markup=False,
        highlight=False,
    )
    stdout.print(f"report: {result.run.report}; next: trace eval {result.run.root}", markup=False, highlight=False)


def _refuse_resume_changes(output: Path, config_file: Optional[Path], overrides: List[str]) -> None:
    """Raise when settings given with `--resume` would change the run's recorded configuration."""
    from trace_dsl.errors import ConfigurationError
    from trace_dsl.runtime.apply import resume_setting_changes
    from trace_dsl.runtime.rundir import RunDirectory

    run = RunDirectory(output)
    if not run.manifest.exists():
        return
    changes = resume_setting_changes(run.read_manifest(), config_file, overrides)
    if changes:
        raise ConfigurationError(
            f"--resume continues {output} with its recorded settings; these options would change them: {'; '.join(changes)}",
            hint="drop them to resume the run as it was, or start a new run with another -o",
        )


@handle_errors
def eval_command(
    run: Path = typer.Argument(..., help="A run directory written by `trace apply`."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Held-out pairs to evaluate on, triaged with the run's policy; default: the run's held-out split."),
    data_format: Optional[str] = typer.Option(None, "--data-format", help="Format of --data; detected when omitted."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed rows of --data instead of stopping."),
    output_format: str = typer.Option("table", "--format", help="Output: table or json."),
    generate_n: int = typer.Option(16, "--generate-n", min=0, help="Held-out prompts to generate responses for and judge for policy agreement (0 skips it)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Maximum new tokens generated per response for policy agreement."),
    max_pairs: int = typer.Option(100, "--max-pairs", min=1, help="Held-out pairs evaluated per category at most (a seeded sample)."),
    utility_text: Optional[Path] = typer.Option(None, "--utility-text", help="Plain-text file for the perplexity check; default: the bundled general-text sample."),
) -> None:
    """Measure a trained run on held-out pairs: inversion, suppression, retention, utility, policy agreement."""
    from trace_dsl.runtime.evaluate import EvalRequest, evaluate_run, format_table

    if output_format not in ("table", "json"):
        raise typer.BadParameter(f"invalid format {output_format!r}; use table or json", param_hint="--format")
    request = EvalRequest(
        run=run,
        data=data,
        data_format=data_format,
        skip_invalid=skip_invalid,
        generate_n=generate_n,
        max_new_tokens=max_new_tokens,
        max_pairs=max_pairs,
        utility_text=utility_text,
        progress=is_terminal(),
    )
    report = evaluate_run(request)
    if output_format == "json":
        stdout.print(json.dumps(report, indent=2, sort_keys=True), markup=False, highlight=False)
    else:
        for line in format_table(report):
            stdout.print(line, markup=False, highlight=False)
