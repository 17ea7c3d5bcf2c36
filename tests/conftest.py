"""Shared fixtures: real faces (bundled demo sample, or ../shared when present) and small sites."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import click
import pytest
import typer

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import (
    AlignmentConfig,
    ConnectionConfig,
    PrivacyConfig,
    SiteConfig,
    TrainConfig,
    dump_site_config,
)

# ../shared/data beside the checkout; FAHR_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("FAHR_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True)
def _operator_config_home(tmp_path_factory, monkeypatch):
    """Keys a server keeps in its operator's config folder (fahr_server.state.state_key_path) go to a
    fresh test folder, never the user's; processes the test starts inherit it."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))


@pytest.fixture(scope="session")
def shared_utkface() -> Path:
    folder = SHARED / "utkface"
    if not (folder / "labels.csv").exists():
        pytest.skip("../shared/data/utkface is not present")
    return folder


def make_sites(
    out: Path,
    faces_dir: Path,
    sizes: tuple[int, ...],
    epsilon: float = 8.0,
    seed: int = 0,
    connections: dict[str, ConnectionConfig] | None = None,
) -> list[Path]:
    """Simulated sites (site1, site2, ...) with CPU-sized training; returns the site.toml paths."""
    n = len(sizes)
    params = SimulationParams(
        n_sites=n,
        site_sizes=sizes,
        site_mean_ages=(45.0, 60.0, 70.0)[:n],
        site_baseline_rates=(0.03, 0.04, 0.02)[:n],
    )
    names = [f"site{i + 1}" for i in range(n)]
    simulate_sites(load_labelled_faces(faces_dir), out, params, seed=seed, site_names=names)
    tomls = []
    for name in names:
        cfg = SiteConfig(
            name=name,
            data=Path("."),
            workdir=Path(".fahr"),
            privacy=PrivacyConfig(epsilon=epsilon),
            train=TrainConfig(local_epochs=1, batch_size=16, lr=1e-3, threads=1),
            connection=(connections or {}).get(name, ConnectionConfig()),
            alignment=AlignmentConfig(workers=1),
        )
        dump_site_config(cfg, out / name / "site.toml")
        tomls.append(out / name / "site.toml")
    return tomls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_processes() -> dict[int, tuple[str, int]]:
    """pid -> (command line, process group) of every live, non-zombie process (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            found[int(pid)] = (cmd, int(stat[2]))
    return found


def flower_processes_under(folder: Path | str) -> list[str]:
    """Command lines of live processes that mention `folder` (ours carry it in their arguments)."""
    return [cmd for cmd, _ in _live_processes().values() if str(folder) in cmd]


def process_groups_under(*marks: Path | str) -> set[int]:
    """Process groups of the live processes whose command line mentions any of `marks`."""
    return {pgid for cmd, pgid in _live_processes().values() if any(str(m) in cmd for m in marks)}


def crash_processes_under(*marks: Path | str) -> set[int]:
    """SIGKILL the whole process group of every process mentioning one of `marks`: a machine crash,
    as far as those processes can tell (no handler runs). Returns the groups."""
    groups = process_groups_under(*marks)
    for pgid in groups:
        os.killpg(pgid, signal.SIGKILL)
    return groups


def live_groups(groups: set[int]) -> list[str]:
    """Command lines of live processes still in `groups`."""
    return [cmd for cmd, pgid in _live_processes().values() if pgid in groups]


@pytest.fixture
def demo_site(tmp_path: Path) -> Path:
    """One small simulated site built from the bundled demo faces; returns its site.toml."""
    return make_sites(tmp_path, demo_faces_dir(), (60,))[0]


def cli_commands() -> list[tuple[str, tuple[str, ...], click.Command]]:
    """(program, argv prefix, command) for every command of the three CLIs, groups included."""
    from fahr_client.cli import app as client_app
    from fahr_research.cli import app as tools_app
    from fahr_server.cli import app as server_app

    def below(cmd: click.Command, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], click.Command]]:
        found = [(path, cmd)]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                found += below(sub, (*path, name))
        return found

    apps = {"fahr": tools_app, "fahr-server": server_app, "fahr-client": client_app}
    return [
        (prog, path, cmd)
        for prog, app in apps.items()
        for path, cmd in below(typer.main.get_command(app), ())
    ]
