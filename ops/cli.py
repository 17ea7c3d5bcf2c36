"""The one way fahr's command-line apps are made, so they all behave alike."""

from __future__ import annotations

import typer


def new_app(help_text: str) -> typer.Typer:
    """A typer app that prints help when called bare and plain tracebacks (no locals: they may hold
    patient data) when something unexpected happens."""
    return typer.Typer(
        help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
