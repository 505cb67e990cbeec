"""Console handling shared by every command: results on stdout, logs and progress on stderr,
and expected errors printed as one message with exit code 1 instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import typer
from rich.console import Console

from trace_dsl.errors import OutputPathError, TraceError

F = TypeVar("F", bound=Callable[..., Any])


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


stdout = Console(no_color=_no_color(), soft_wrap=True)
stderr = Console(stderr=True, no_color=_no_color())


def fail(message: str, *, hint: str | None = None, code: int = 1) -> "typer.Exit":
    """Print an error on stderr and return the `typer.Exit` to raise."""
    stderr.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        stderr.print(f"hint: {hint}", markup=False, highlight=False)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn a `TraceError` or an `OSError` raised by a command into a printed message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TraceError as exc:
            # soft_wrap: a path broken across lines at column 80 cannot be copied or grepped.
            stderr.print(f"[bold red]error[{exc.code}]:[/] ", end="", markup=True)
            stderr.print(exc.message, markup=False, highlight=False, soft_wrap=True)
            if exc.hint:
                stderr.print(f"hint: {exc.hint}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            # Reading or writing a file failed after the checks (disk full, permissions). Name the
            # file instead of printing a traceback.
            where = f": {exc.filename}" if exc.filename else ""
            stderr.print(f"[bold red]error:[/] {exc.strerror or exc}{where}", markup=True, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted; work already written to disk is kept", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def check_output_path(path: Path, label: str, *, inputs: Iterable[str | Path] = ()) -> None:
    """Create the folder of output file `path`, or raise before any work when it cannot be written.

    Called before a long triage, diff or plan, so a mistyped `-o` fails in a second instead of
    after the work is done. `inputs` are the files the command reads (data, policies, also given
    as FILE@REVISION), which the output must not replace.

    Raises:
        OutputPathError: `path` is a folder or one of `inputs`, or its folder cannot be created
            or written.
    """
    if path.is_file():
        for given in inputs:
            for candidate in {str(given), str(given).rpartition("@")[0] or str(given)}:
                if Path(candidate).is_file() and os.path.samefile(candidate, path):
                    raise OutputPathError(f"{label} {path} is the input {given}; writing it would destroy the input",
                                          hint="pass another output path")
    if path.is_dir():
        raise OutputPathError(f"{label} {path} is a folder, not a file",
                              hint=f"name a file, for example {path / ('out' + path.suffix if path.suffix else 'out')}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the folder of {label} {path}: {exc.strerror or exc}",
                              hint="pass a path in a writable folder") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputPathError(f"cannot write {label} {path}: its folder is read-only",
                              hint="pass a path in a writable folder")


def is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are drawn only then)."""
    return sys.stderr.isatty()
