"""The `trace` application: global options and the registration of every command group."""

from __future__ import annotations

import platform
import warnings

import typer

import trace_dsl
from trace_dsl.cli import data_cmd, policy_cmd, runtime_cmd, versions_cmd
from trace_dsl.cli.common import stdout

app = typer.Typer(
    name="trace",
    help="Policy-as-code for re-aligning language models when their policy changes (TRACE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"trace-dsl {trace_dsl.__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Policy-as-code for re-aligning language models when their policy changes (TRACE)."""


@app.command("env")
def env_command() -> None:
    """Print the versions and device this toolkit runs with, for bug reports."""
    import importlib.metadata as md

    rows = [("trace-dsl", trace_dsl.__version__), ("python", platform.python_version()), ("platform", platform.platform())]
    for dist in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "lark", "pydantic"):
        try:
            rows.append((dist, md.version(dist)))
        except md.PackageNotFoundError:
            rows.append((dist, "not installed"))
    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
        else:
            device = f"cpu ({torch.get_num_threads()} threads)"
    except ImportError:
        device = "unknown (torch not installed)"
    rows.append(("device", device))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        stdout.print(f"{name.ljust(width)}  {value}", markup=False, highlight=False)


data_cmd.register(app)
policy_cmd.register(app)
runtime_cmd.register(app)
versions_cmd.register(app)


def main() -> None:
    """Run the `trace` application (the console entry point)."""
    # peft calls a transformers method that transformers 5 deprecates; users cannot act on the
    # notice, and it repeats on every model load.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    app()


if __name__ == "__main__":
    main()
