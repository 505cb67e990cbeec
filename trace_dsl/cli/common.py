"""Console handling shared by every command: results on stdout, logs and progress on stderr,
and expected errors printed as one message with exit code 1 instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from trace_dsl.errors import TraceError

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
    """Turn a `TraceError` raised by a command into a printed message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TraceError as exc:
            stderr.print(f"[bold red]error[{exc.code}]:[/] ", end="", markup=True)
            stderr.print(exc.message, markup=False, highlight=False)
            if exc.hint:
                stderr.print(f"hint: {exc.hint}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("interrupted; work already written to disk is kept", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are drawn only then)."""
    return sys.stderr.isatty()
