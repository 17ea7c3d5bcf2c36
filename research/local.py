"""A whole federation on one machine: the server and every site as real, separate processes.

Used by `fahr demo` and the end-to-end tests. Sites are started exactly as a hospital would start
them (`fahr-client start`), each in its own process group, and always stopped at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fahr_core.config import ConnectionConfig, load_server_config, load_site_config, model_table, toml_value
from fahr_core.models import shipped
from fahr_core.workdir import ServerWorkdir
from fahr_ops.certs import create_server_tls, create_site_keys
from fahr_ops.flower import console_script, local_address
from fahr_ops.processes import Managed, free_local_port


def local_credentials(
    certs: Path, sites: Sequence[str], port: int
) -> tuple[str, dict[str, ConnectionConfig]]:
    """A CA and server certificate for 127.0.0.1 and a key pair per site, as `fahr certs` makes them.

    Returns the server's `[security]` TOML table and each site's connection settings.
    """
    tls = create_server_tls(certs, ["127.0.0.1", "localhost"])
    connections, pubs = {}, []
    for site in sites:
        private, public = create_site_keys(certs / "sites", site)
        pubs.append(public)
        connections[site] = ConnectionConfig(f"127.0.0.1:{port}", tls.ca_cert, private)
    keys = ", ".join(toml_value(p) for p in pubs)
    table = (
        f"[security]\nca_cert = {toml_value(tls.ca_cert)}\nserver_cert = {toml_value(tls.cert)}\n"
        f"server_key = {toml_value(tls.key)}\nsite_keys = [{keys}]\n"
    )
    return table, connections


def demo_server_toml(rounds: int, n_sites: int, port: int, security: str) -> str:
    """The demo's server.toml: its sites on 127.0.0.1, started from the shipped models."""
    return f"""[federation]
rounds = {rounds}
min_sites = {n_sites}
port = {port}
workdir = "server"

{model_table(shipped.start_spec())}
{security}"""


def start_site(toml: Path, superlink: str, runtime_port: int, insecure: bool = False) -> Managed:
    """`fahr-client start` for the site in `toml`, as a hospital would run it, in its own process group."""
    site = load_site_config(toml)
    cmd = [
        console_script("fahr-client"),
        "start",
        "--site",
        site.name,
        "--config",
        str(toml),
        "--superlink",
        superlink,
        "--runtime-port",
        str(runtime_port),
    ]
    cmd += ["--insecure"] if insecure else []
    return Managed(f"site {site.name}", cmd, site.workdir.parent / f"{site.name}-client.log")


def _echo_lines(path: Path, echo: Callable[[str], object], done: threading.Event) -> None:
    """Echo the lines appended to `path` until `done` is set and the file has no more to give."""
    with path.open("rb") as f:
        f.seek(0, 2)
        while True:
            line = f.readline()
            if line:
                echo(line.decode(errors="replace").rstrip())
            elif done.is_set():
                return
            else:
                time.sleep(0.1)


def run_local_federation(
    server_toml: Path,
    site_tomls: Sequence[Path],
    echo: Callable[[str], object] = print,
    insecure: bool = False,
    resume: bool = False,
) -> int:
    """Run the federation in `server_toml` with the sites in `site_tomls` on 127.0.0.1; exit code.

    The server is `fahr-server run` and each site `fahr-client start`, each its own process group, as
    an operator would run them; the sites start once the server marks its SuperLink ready (keys
    registered: a site connecting earlier would be refused). Secure unless `insecure`: the server
    config then needs `[security]` and each site `[connection]` (see `local_credentials`). `resume`
    continues an interrupted run (`fahr-server run --resume`).
    """
    cfg = load_server_config(server_toml)
    ready = ServerWorkdir(cfg.workdir).ready
    ready.unlink(missing_ok=True)
    cmd = [console_script("fahr-server"), "run", "--config", str(Path(server_toml).resolve())]
    cmd += (["--insecure"] if insecure else []) + (["--resume"] if resume else [])
    console = cfg.workdir.parent / f"{cfg.workdir.name}-console.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    console.touch()
    done = threading.Event()
    follower = threading.Thread(target=_echo_lines, args=(console, echo, done), daemon=True)
    follower.start()
    server = Managed("fahr-server", cmd, console)
    clients: list[Managed] = []
    try:
        while server.running and not clients:
            if ready.exists():
                clients = [
                    start_site(toml, local_address(cfg.address, cfg.port), free_local_port(), insecure)
                    for toml in site_tomls
                ]
            time.sleep(0.2)
        code = server.proc.wait()
        done.set()
        follower.join()
        if code:
            for c in clients:
                echo(f"--- {c.name}: last lines of {c.log_path}\n{c.tail()}")
        return code
    finally:
        done.set()
        server.stop()
        for c in clients:
            c.stop()
