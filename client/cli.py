"""`fahr-client`: what a hospital site operator runs: check the site's data, join a federation."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from fahr_client.status import site_status
from fahr_core.cohort import Cohort
from fahr_core.cohort.check import check_site
from fahr_core.cohort.schema import COHORT_FILE
from fahr_core.config import SITE_CONFIG_FILE, ConfigError, SiteConfig, is_set, load_site_config
from fahr_core.privacy.randomness import refuse_test_rng
from fahr_core.protocol import keys
from fahr_ops.cli import VersionOption, new_app
from fahr_ops.flower import flower_env, start_supernode
from fahr_ops.processes import free_local_port, is_loopback, port_free

app = new_app("A fahr hospital site.")

SiteOpt = Annotated[str, typer.Option("--site", help=r"site name; must match \[site].name in the config")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="site TOML (default: ./<site>/site.toml)")
]


_debug = False  # --debug: unexpected errors show their traceback instead of one line
INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="show a traceback for unexpected errors")] = False,
    version: VersionOption = False,
) -> None:
    """A fahr hospital site."""
    global _debug
    _debug = debug
    # Everything a site writes (aligned faces, caches, ledger, reports, logs) is its patients' data:
    # the site's account only. Worker and SuperNode processes inherit the mask.
    os.umask(0o077)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _one_line_errors(what: str) -> Iterator[None]:
    """Any unexpected error becomes one line naming the file (no traceback unless --debug)."""
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        if _debug:
            raise
        if isinstance(e, OSError) and e.filename:
            why = f"{e.filename}: {e.strerror or e}; check it exists and this account may write there"
        else:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise _fail(f"error: {what}: {why} (--debug shows the details)", 1) from None


def _stop_on_signals() -> None:
    """SIGTERM (systemd, docker stop, kill) stops a command the way Ctrl-C does, and only the first
    signal counts: a second Ctrl-C while the command stops its workers would cut that short and end
    it with a traceback (and workers left behind) instead of its "stopped" message."""

    def _stop(signum, _frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)


def _load(site: str, config: Path | None) -> tuple[SiteConfig, Path]:
    path = (config or Path(site) / SITE_CONFIG_FILE).resolve()
    try:
        cfg = load_site_config(path)
    except ConfigError as e:
        raise _fail(f"error: {e}", 2) from None
    if cfg.name != site:
        raise _fail(f"error: {path} is the config of site {cfg.name!r}, not {site!r}", 2)
    return cfg, path


def _checked(cfg: SiteConfig, path: Path, refusal: str) -> Cohort:
    """The site's cohort once `check_site` finds no problem; else every problem on stderr and exit 1."""
    with _one_line_errors(f"checking site {cfg.name}"):
        result = check_site(cfg, str(path))
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if result.problems or result.cohort is None:
        lines = [f"{path}: {len(result.problems)} problem(s) found", *result.problems]
        raise _fail("\n".join([*lines, refusal]), 1)
    return result.cohort


@app.command()
def check(site: SiteOpt, config: ConfigOpt = None) -> None:
    """Validate site.toml, the files it names, cohort.csv and every photo; exit 1 listing every problem."""
    cfg, path = _load(site, config)
    cohort = _checked(cfg, path, f"site {site} is not ready: fix these, then run check again.")
    n = sum(len(p.photos) for p in cohort.patients)
    typer.echo(f"site {cfg.name}: {len(cohort)} patients, {n} photos in {cfg.data / COHORT_FILE}: OK")


def _align(cfg: SiteConfig, cohort: Cohort) -> None:
    """Align the site's photos with a progress bar; exit non-zero unless the site can train.

    Ctrl-C or SIGTERM stops within seconds (the workers are killed, not drained); photos finished
    so far are kept and the next run resumes from them.
    """
    from fahr_client.runtime import SiteRuntime  # torch and the detectors: only commands that align pay

    _stop_on_signals()
    try:
        with (
            _one_line_errors(f"aligning site {cfg.name}'s photos"),
            typer.progressbar(length=1, label=f"aligning {cfg.name}'s photos") as bar,
        ):

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(1)

            table = SiteRuntime(cfg).align(cohort, progress=progress)
    except KeyboardInterrupt:
        raise _fail(
            f"\nsite {cfg.name}: alignment stopped; finished photos are kept, run align again to resume",
            INTERRUPTED,
        ) from None
    typer.echo(
        f"{len(table.aligned)} of {len(table.rows)} photos aligned ({table.cached} from cache); "
        f"table: {table.csv_path}"
    )
    for row in table.rejected[:20]:
        typer.echo(f"  rejected {row.path}: {row.reason}")
    if len(table.rejected) > 20:
        typer.echo(f"  ... and {len(table.rejected) - 20} more (see the table)")
    aligned = {Path(r.path) for r in table.aligned}
    usable = sum(any(p in aligned for p in pt.photos) for pt in cohort.patients)
    if usable < 2:
        raise _fail(
            f"error: site {cfg.name} cannot train: {usable} patient(s) have an aligned photo (at least 2 "
            f"needed); see the reasons in {table.csv_path}",
            1,
        )


@app.command()
def align(site: SiteOpt, config: ConfigOpt = None) -> None:
    """Detect, quality-check and align the site's photos (resumable); exit 0 only if the site can train."""
    cfg, path = _load(site, config)
    _align(cfg, _checked(cfg, path, f"site {site}: fix these before aligning."))


@app.command()
def start(
    site: SiteOpt,
    config: ConfigOpt = None,
    superlink: Annotated[
        str | None, typer.Option(help=r"SuperLink host:port (default: \[connection].superlink)")
    ] = None,
    runtime_port: Annotated[
        int,
        typer.Option(help="local port of this SuperNode's runtime API; 0: any free one (sites share hosts)"),
    ] = 0,
    insecure: Annotated[bool, typer.Option(help="plain HTTP; for loopback tests only")] = False,
) -> None:
    """Check the site's data, then join the federation until stopped (Ctrl-C)."""
    cfg, path = _load(site, config)
    cohort = _checked(cfg, path, f"site {site} will not join the federation until these are fixed.")
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
        try:  # a real site: DP noise that a test seed makes reproducible would protect no one
            refuse_test_rng(f"to start site {cfg.name} without --insecure")
        except RuntimeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        missing = [k for k in ("root_certificates", "auth_key") if not is_set(getattr(cfg.connection, k))]
        if missing:
            typer.echo(
                f"error: {path} [connection] needs {' and '.join(missing)} (the federation's ca.crt "
                "and this site's private key from `fahr certs site`), or pass --insecure",
                err=True,
            )
            raise typer.Exit(2)
    if runtime_port == 0:
        runtime_port = free_local_port()
    elif not port_free("127.0.0.1", runtime_port):
        typer.echo(
            f"error: runtime port {runtime_port} is in use (another site's SuperNode on this host?); "
            "pass another --runtime-port, or 0 for any free one",
            err=True,
        )
        raise typer.Exit(2)
    _align(cfg, cohort)
    log_path = cfg.paths.supernode_log
    with _one_line_errors(f"starting site {cfg.name}'s SuperNode"):
        node = start_supernode(
            address,
            {keys.NODE_SITE: cfg.name, keys.SITE_CONFIG: str(path)},
            runtime_port,
            log_path,
            flower_env(cfg.paths.flwr_home),
            connection,
        )
    typer.echo(f"site {cfg.name}: {len(cohort)} patients; SuperNode joining {address} (logs: {log_path})")

    try:
        code = node.proc.wait()
        typer.echo(f"SuperNode exited with code {code}; last lines:\n{node.tail()}", err=True)
        raise typer.Exit(code or 1)
    except KeyboardInterrupt:
        typer.echo(f"site {cfg.name}: leaving the federation")
    finally:
        node.stop()


@app.command()
def status(site: SiteOpt, config: ConfigOpt = None) -> None:
    """The site's privacy ledger (epsilon per run and round, budget left), last rounds, audit-log check."""
    cfg, _ = _load(site, config)
    for line in site_status(cfg):
        typer.echo(line)


if __name__ == "__main__":
    sys.exit(app())
