"""`fahr-client`: what a hospital site operator runs: check the site's data, join a federation."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from fahr_core.cohort import CohortError, load_cohort
from fahr_core.config import ConfigError, SiteConfig, load_site_config
from fahr_server.flower import flower_env, start_supernode

app = typer.Typer(
    help="A fahr hospital site.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)

SiteOpt = Annotated[str, typer.Option("--site", help="site name; must match [site].name in the config")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="site TOML (default: ./<site>/site.toml)")
]


@app.callback()
def _main() -> None:
    """A fahr hospital site."""


def _load(site: str, config: Path | None) -> tuple[SiteConfig, Path]:
    path = (config or Path(site) / "site.toml").resolve()
    try:
        cfg = load_site_config(path)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if cfg.name != site:
        typer.echo(f"error: {path} is the config of site {cfg.name!r}, not {site!r}", err=True)
        raise typer.Exit(2)
    return cfg, path


@app.command()
def check(site: SiteOpt, config: ConfigOpt = None) -> None:
    """Validate the site's config, cohort.csv and photos; exit 1 listing every problem."""
    cfg, _ = _load(site, config)
    try:
        n = len(load_cohort(cfg.data))
    except CohortError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"site {cfg.name}: {n} patients in {cfg.data / 'cohort.csv'}: OK")


@app.command()
def start(
    site: SiteOpt,
    config: ConfigOpt = None,
    superlink: Annotated[
        str, typer.Option(help="the server's SuperLink address host:port")
    ] = "127.0.0.1:8000",
    runtime_port: Annotated[int, typer.Option(help="local port of this SuperNode's runtime API")] = 9094,
    insecure: Annotated[bool, typer.Option(help="plain HTTP; for loopback tests only")] = False,
) -> None:
    """Check the site's data, then join the federation until stopped (Ctrl-C)."""
    cfg, path = _load(site, config)
    try:
        n = len(load_cohort(cfg.data))
    except CohortError as e:
        typer.echo(f"{e}\nsite {site} will not join the federation until these are fixed.", err=True)
        raise typer.Exit(1) from None
    if not insecure:
        typer.echo("error: TLS is not wired yet in this version; pass --insecure (loopback only)", err=True)
        raise typer.Exit(2)
    typer.secho(
        "WARNING: --insecure: traffic to the server is NOT encrypted. Loopback tests only.",
        fg=typer.colors.RED,
        err=True,
    )
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.workdir / "supernode.log"
    node = start_supernode(
        superlink,
        {"site": cfg.name, "site-config": str(path)},
        runtime_port,
        log_path,
        flower_env(cfg.workdir / "flwr-home"),
        insecure,
    )
    typer.echo(f"site {cfg.name}: {n} patients; SuperNode connecting to {superlink} (logs: {log_path})")

    def _stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        code = node.proc.wait()
        typer.echo(f"SuperNode exited with code {code}; last lines:\n{node.tail()}", err=True)
        raise typer.Exit(code or 1)
    except KeyboardInterrupt:
        typer.echo(f"site {cfg.name}: leaving the federation")
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(app())
