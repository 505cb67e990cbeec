"""Commands registered by this module (filled in by its layer)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `trace` application."""
