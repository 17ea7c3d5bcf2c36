"""`fahr-client`: what a hospital site operator runs: check the site's data, join a federation."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from fahr_core.cohort import Cohort, CohortError, load_cohort
from fahr_core.config import ConfigError, SiteConfig, is_set, load_site_config
from fahr_ops.cli import new_app
from fahr_ops.flower import flower_env, start_supernode
from fahr_ops.processes import is_loopback

app = new_app("A fahr hospital site.")

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


def _align(cfg: SiteConfig, cohort: Cohort) -> None:
    """Align the site's photos with a progress bar; only photos not aligned before do work."""
    from fahr_client.runtime import SiteRuntime  # torch and the detectors: only commands that align pay

    with typer.progressbar(length=1, label=f"aligning {cfg.name}'s photos") as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(1)

        table = SiteRuntime(cfg).align(cohort, progress=progress)
    typer.echo(
        f"{len(table.aligned)} of {len(table.rows)} photos aligned ({table.cached} from cache); "
        f"table: {table.csv_path}"
    )
    for row in table.rejected[:20]:
        typer.echo(f"  rejected {row.path}: {row.reason}")
    if len(table.rejected) > 20:
        typer.echo(f"  ... and {len(table.rejected) - 20} more (see the table)")


@app.command()
def align(site: SiteOpt, config: ConfigOpt = None) -> None:
    """Detect, quality-check and align the site's photos to the ArcFace 112x112 template (resumable)."""
    cfg, _ = _load(site, config)
    try:
        cohort = load_cohort(cfg.data)
    except CohortError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    _align(cfg, cohort)


@app.command()
def start(
    site: SiteOpt,
    config: ConfigOpt = None,
    superlink: Annotated[
        str | None, typer.Option(help="SuperLink host:port (default: [connection].superlink)")
    ] = None,
    runtime_port: Annotated[int, typer.Option(help="local port of this SuperNode's runtime API")] = 9094,
    insecure: Annotated[bool, typer.Option(help="plain HTTP; for loopback tests only")] = False,
) -> None:
    """Check the site's data, then join the federation until stopped (Ctrl-C)."""
    cfg, path = _load(site, config)
    try:
        cohort = load_cohort(cfg.data)
    except CohortError as e:
        typer.echo(f"{e}\nsite {site} will not join the federation until these are fixed.", err=True)
        raise typer.Exit(1) from None
    address = superlink or cfg.connection.superlink
    connection = None if insecure else cfg.connection
    if insecure:
        if not is_loopback(address.rsplit(":", 1)[0]):
            typer.echo(f"error: --insecure is for loopback tests only, not for {address}", err=True)
            raise typer.Exit(2)
        typer.secho(
            "WARNING: --insecure: no TLS and no site authentication. Loopback tests only.",
            fg=typer.colors.RED,
            err=True,
        )
    else:
        missing = [k for k in ("root_certificates", "auth_key") if not is_set(getattr(cfg.connection, k))]
        if missing:
            typer.echo(
                f"error: {path} [connection] needs {' and '.join(missing)} (the federation's ca.crt "
                "and this site's private key from `fahr certs site`), or pass --insecure",
                err=True,
            )
            raise typer.Exit(2)
    _align(cfg, cohort)
    log_path = cfg.workdir / "supernode.log"
    node = start_supernode(
        address,
        {"site": cfg.name, "site-config": str(path)},
        runtime_port,
        log_path,
        flower_env(cfg.workdir / "flwr-home"),
        connection,
    )
    typer.echo(f"site {cfg.name}: {len(cohort)} patients; SuperNode joining {address} (logs: {log_path})")

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
