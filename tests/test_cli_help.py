"""Every command of the three CLIs says what it does, keeps its help text whole, and has --version."""

from __future__ import annotations

import re

import click
import pytest
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.release import fahr_version
from fahr_research.cli import app as tools_app
from fahr_server.cli import app as server_app
from tests.support import cli_commands

APPS = {"fahr": tools_app, "fahr-server": server_app, "fahr-client": client_app}


ALL = cli_commands()


def flat(text: str) -> str:
    """Rendered help without Rich's box drawing and line wrapping."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(("prog", "path", "cmd"), ALL, ids=[" ".join((p, *a)) for p, a, _ in ALL])
def test_help_is_complete_and_keeps_bracketed_text(prog, path, cmd) -> None:
    out = CliRunner().invoke(APPS[prog], [*path, "--help"], terminal_width=200, prog_name=prog)
    assert out.exit_code == 0, out.output
    assert (cmd.help or "").strip(), f"{prog} {' '.join(path)} has no help text"
    shown = flat(out.output)
    texts = {"": cmd.help or ""}
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{prog} {' '.join(path)} {param.opts[0]} has no help text"
            texts[f" {param.opts[0]}"] = param.help
    for where, text in texts.items():
        # Rich markup would swallow "[federation]"; the source escapes it as "\[federation]"
        for bracketed in re.findall(r"\[[^\]]*\]", text.replace("\\[", "[")):
            assert bracketed in shown, f"{prog} {' '.join(path)}{where}: {bracketed} lost"


@pytest.mark.parametrize("prog", APPS)
def test_every_cli_prints_the_version_the_federation_compares(prog) -> None:
    out = CliRunner().invoke(APPS[prog], ["--version"], prog_name=prog)
    assert out.exit_code == 0 and out.output.strip() == f"fahr {fahr_version()}"
