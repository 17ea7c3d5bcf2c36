"""`fahr-server`: run a federation: start a SuperLink, submit the fahr run, stream its progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fahr_core.config import ConfigError, ServerConfig, load_server_config
from fahr_core.io import atomic_write_text
from fahr_ops.cli import new_app
from fahr_ops.flower import (
    check_wildcard_certificate,
    console_script,
    flower_env,
    local_address,
    register_sites,
    start_superlink,
    write_app,
    write_cli_connection,
)
from fahr_ops.processes import host_port, is_loopback, port_free, tail
from fahr_server.events import describe, end_of_log, follow
from fahr_server.state import (
    ResumeError,
    earlier_run_records,
    read_state,
    resume_point,
    set_aside_uncommitted,
    trim_rounds_log,
)
from fahr_server.status import federation_status

app = new_app("The fahr federation server.")


def run_federation(
    cfg: ServerConfig,
    config_path: Path,
    insecure: bool,
    echo=print,
    on_ready: Callable[[], object] | None = None,
    resume: bool = False,
) -> int:
    """Start a SuperLink, run the federation to its end, stop the SuperLink. Returns an exit code.

    `on_ready` runs once the SuperLink is up and the site keys are registered (sites started before
    their key is registered are refused), just before the run is submitted. With `resume` the run
    continues after the last round recorded in the workdir's state.json; without it, a workdir
    holding an earlier run's results is refused rather than mixed with a new run.
    """
    work = cfg.workdir
    work.mkdir(parents=True, exist_ok=True)
    first = _first_round(cfg, resume, echo)
    if first is None:
        return 2
    paths = cfg.paths
    paths.run_summary.unlink(missing_ok=True)
    if not port_free(cfg.address, cfg.port):
        where = host_port(cfg.address, cfg.port)
        echo(f"error: {where} is in use (another SuperLink?); set [federation].port")
        return 2
    security = None if insecure else cfg.security
    if security is None and not insecure:
        echo(
            f"error: {config_path} has no [security] table: create certificates and site keys with "
            "`fahr certs init` and `fahr certs site`, or pass --insecure for a loopback test"
        )
        return 2
    try:
        check_wildcard_certificate(cfg.address, security)
    except ValueError as e:
        echo(f"error: {e}")
        return 2
    env = flower_env(paths.flwr_home)
    app_dir = write_app(paths.app, config_path, resume)
    write_cli_connection(paths.flwr_home, local_address(cfg.address, cfg.port), security)
    mode = "plain HTTP (--insecure)" if security is None else "TLS + SuperNode authentication"
    log_path = paths.superlink_log
    echo(f"starting SuperLink on {host_port(cfg.address, cfg.port)}, {mode} (logs: {log_path})")
    link = start_superlink(cfg.address, cfg.port, paths.superlink_db, log_path, env, security)
    runner = None
    console = _Console(work, echo)

    def _stop(signum, _frame):  # Ctrl-C or SIGTERM: take everything we started down with us
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if security is not None:
            register_sites(security.site_keys, env, work, log_path, echo)
            echo(f"registered {len(security.site_keys)} site key(s); unregistered sites are refused")
        atomic_write_text(paths.ready, f"{host_port(cfg.address, cfg.port)}\n")
        if on_ready is not None:
            on_ready()
        echo(
            f"submitting run: rounds {first} to {cfg.rounds}, at least {cfg.min_sites} sites, "
            f"model {cfg.model.arch}"
        )
        console.start()
        with paths.run_log.open("ab") as log:  # Flower's own log: the file, not the console
            runner = subprocess.Popen(
                [console_script("flwr"), "run", str(app_dir), "fahr", "--stream"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=work,
                start_new_session=True,
            )
            for line in runner.stdout:
                log.write(line)
                log.flush()
            code = runner.wait()
        console.stop()
        summary = paths.run_summary
        if not summary.exists():
            echo(
                f"error: the run ended without finishing (flwr exit code {code}); see {paths.run_log} "
                f"and {paths.superlink_log}"
            )
            echo(f"--- last lines of {paths.run_log}\n{tail(paths.run_log)}")
            return code or 1
        done = json.loads(summary.read_text())
        echo(
            f"federation finished: {len(done['completed_rounds'])} rounds, sites reporting: "
            f"{', '.join(done['sites_reporting']) or 'none'}"
        )
        echo(f"global weights: {paths.global_model}")
        echo(f"federation report: {paths.report_page}")
        return 0
    except KeyboardInterrupt:
        echo("interrupted: stopping the federation")
        return 130
    finally:
        paths.ready.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
        console.stop()
        if runner is not None and runner.poll() is None:
            runner.terminate()
        link.stop()


class _Console:
    """Prints the run's events (fahr_server.events) as the ServerApp writes them, from a thread."""

    def __init__(self, workdir: Path, echo: Callable[[str], object]):
        self._done = threading.Event()
        offset = end_of_log(workdir)  # an earlier run's events (a resumed workdir) were shown then
        self._thread = threading.Thread(
            target=lambda: [echo(describe(e)) for e in follow(workdir, offset, self._done.is_set)],
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Print what is left and stop following (idempotent)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def _first_round(cfg: ServerConfig, resume: bool, echo: Callable[[str], object]) -> int | None:
    """The round this run starts at, or None (after saying why) when it must not start."""
    if not resume:
        aside = set_aside_uncommitted(cfg.workdir)
        if aside is not None:
            echo(f"the earlier run in {cfg.workdir} completed no round; its logs are kept in {aside}")
        found = earlier_run_records(cfg.workdir)
        if found:
            echo(
                f"error: {cfg.workdir} holds an earlier federation's results ({', '.join(found)}); "
                "continue it with --resume, or set another [federation].workdir for a new federation"
            )
            return None
        return 1
    try:
        state = resume_point(cfg)
    except ResumeError as e:
        echo(f"error: {e}")
        return None
    trim_rounds_log(cfg.workdir, state.last_round)
    echo(f"resuming: rounds 1 to {state.last_round} of {state.rounds} completed ({state.checkpoint})")
    return state.last_round + 1


def _load(config: Path) -> ServerConfig:
    try:
        return load_server_config(config)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help=r"server TOML (\[federation], \[model])")],
    insecure: Annotated[bool, typer.Option(help="plain HTTP; for loopback tests only")] = False,
    resume: Annotated[
        bool, typer.Option(help="continue after the last completed round recorded in the workdir")
    ] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(help="continue an interrupted run if the workdir holds one, else start one (systemd)"),
    ] = False,
) -> None:
    """Run a federation to its end and write the global report."""
    cfg = _load(config)
    from fahr_core.models.initial import init_problem  # here: torch is not needed for --help

    problem = init_problem(cfg.model)
    if problem:
        typer.echo(f"error: {config}: {problem}", err=True)
        raise typer.Exit(2)
    if auto_resume:
        try:
            resume = resume or read_state(cfg.workdir) is not None
        except ResumeError:
            resume = True  # resuming says what is wrong with the state file
    if insecure:
        if not is_loopback(cfg.address):
            typer.echo(
                f"error: --insecure is for loopback tests only, not for address {cfg.address}", err=True
            )
            raise typer.Exit(2)
        typer.secho(
            "WARNING: --insecure: no TLS and no site authentication. Loopback tests only.",
            fg=typer.colors.RED,
            err=True,
        )
    raise typer.Exit(run_federation(cfg, config.resolve(), insecure, echo=typer.echo, resume=resume))


@app.command()
def status(
    config: Annotated[Path, typer.Option("--config", "-c", help=r"server TOML (its \[federation].workdir)")],
) -> None:
    """Where a running or finished federation stands: rounds, sites, updates, rejections, privacy."""
    for line in federation_status(_load(config)):
        typer.echo(line)


if __name__ == "__main__":
    sys.exit(app())
