"""A whole federation on one machine: the server and every site as real, separate processes.

Used by `fahr demo` and the end-to-end tests. Sites are started exactly as a hospital would start
them (`fahr-client start`), each in its own process group, and always stopped at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fahr_core.config import load_server_config, load_site_config
from fahr_core.processes import Managed
from fahr_server.cli import run_federation
from fahr_server.flower import console_script


def run_local_federation(
    server_toml: Path, site_tomls: Sequence[Path], echo: Callable[[str], object] = print
) -> int:
    """Run the federation in `server_toml` with the sites in `site_tomls` on 127.0.0.1; exit code."""
    cfg = load_server_config(server_toml)
    clients: list[Managed] = []
    try:
        for i, toml in enumerate(site_tomls):
            site = load_site_config(toml)
            cmd = [
                console_script("fahr-client"),
                "start",
                "--site",
                site.name,
                "--config",
                str(toml),
                "--superlink",
                f"{cfg.address}:{cfg.port}",
                "--runtime-port",
                str(cfg.port + 100 + i),
                "--insecure",
            ]
            clients.append(Managed(f"site {site.name}", cmd, site.workdir.parent / f"{site.name}-client.log"))
        code = run_federation(cfg, Path(server_toml).resolve(), insecure=True, echo=echo)
        if code:
            for c in clients:
                echo(f"--- {c.name}: last lines of {c.log_path}\n{c.tail()}")
        return code
    finally:
        for c in clients:
            c.stop()
