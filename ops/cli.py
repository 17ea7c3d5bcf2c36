"""The one way fahr's command-line apps are made, so they all behave alike."""

from __future__ import annotations

from typing import Annotated

import typer

from fahr_core.release import fahr_version


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fahr {fahr_version()}")
        raise typer.Exit()


# --version on every CLI; an app with a callback of its own adds it to that callback's parameters
VersionOption = Annotated[
    bool,
    typer.Option("--version", is_eager=True, callback=_print_version, help="print fahr's version and exit"),
]


def new_app(help_text: str) -> typer.Typer:
    """A typer app that prints help when called bare, plain tracebacks (no locals: they may hold
    patient data) when something unexpected happens, and `--version`.

    Help is rendered as Rich markup, where `[federation]` is a tag and vanishes: write a config
    table in help text as `\\[federation]` (tests/test_cli_help.py checks every command).
    (Typer's plain mode, rich_markup_mode=None, is no way out: it prints `\\[default: ...]`.)
    """
    app = typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _main(version: VersionOption = False) -> None:
        pass

    return app
