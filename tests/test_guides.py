"""The guides say what the code does: every command and config key is documented, every message
the troubleshooting page quotes is still emitted, and the site operator guide works as written."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from fahr_core.config import (
    AlignmentConfig,
    ConnectionConfig,
    ModelConfig,
    PrivacyConfig,
    SecurityConfig,
    ServerConfig,
    SiteConfig,
    TrainConfig,
)
from fahr_core.workdir import SITE_WORKDIR, ServerWorkdir, SiteWorkdir
from fahr_ops.certs import create_server_tls
from fahr_ops.flower import console_script
from fahr_ops.processes import Managed
from tests.support import cli_commands, flower_processes_under, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = [
    path
    for package in ("fahr_core", "ops", "server", "client", "research")
    for path in (ROOT / package).rglob("*.py")
]
# config table -> the dataclass whose fields are its keys (fahr_core.config reads them so)
TABLES = {
    "federation": ServerConfig,
    "model": ModelConfig,
    "security": SecurityConfig,
    "site": SiteConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "connection": ConnectionConfig,
    "alignment": AlignmentConfig,
}
NESTED = {"model", "security", "privacy", "train", "connection", "alignment"}  # tables, not keys


def _docs() -> str:
    return "\n".join(p.read_text() for p in DOCS)


@pytest.mark.parametrize(("prog", "path"), [(p, a) for p, a, _ in cli_commands() if a])
def test_every_command_is_documented(prog: str, path: tuple[str, ...]) -> None:
    assert " ".join((prog, *path)) in _docs(), f"no doc mentions `{' '.join((prog, *path))}`"


@pytest.mark.parametrize(
    ("table", "key"),
    [(t, f.name) for t, cls in TABLES.items() for f in dataclasses.fields(cls) if f.name not in NESTED],
)
def test_every_config_key_is_documented(table: str, key: str) -> None:
    assert f"[{table}].{key}" in _docs(), f"no doc describes [{table}].{key}"


def test_troubleshooting_quotes_only_messages_the_code_emits() -> None:
    code = "\n".join(p.read_text() for p in CODE)
    quoted = [
        q
        for line in (ROOT / "docs" / "troubleshooting.md").read_text().splitlines()
        if line.startswith("### ")
        for q in re.findall(r"`([^`]+)`", line)
    ]
    assert len(quoted) > 25
    missing = [q for q in quoted if q not in code]
    assert not missing, f"docs/troubleshooting.md quotes messages no code emits: {missing}"


def _guide_commands() -> list[str]:
    """The `fahr` and `fahr-client` lines of the site operator guide's shell blocks, in order."""
    text = (ROOT / "docs" / "site-operator.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("fahr ", "fahr-client "))]


@pytest.mark.slow
def test_the_site_operator_guide_works_as_written(tmp_path: Path) -> None:
    """Sections 2 to 7 on loopback: a coordinator with one registered site, the bundled detector,
    a semi-synthetic cohort; each command of the guide run as written, /srv/fahr/maastro being
    the site folder."""
    commands = _guide_commands()
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs == ["certs", "check", "align", "start", "status"], commands
    site_dir = tmp_path / "srv" / "maastro"
    bin_dir = Path(console_script("fahr")).parent

    def argv(command: str) -> list[str]:
        words = shlex.split(command.replace("/srv/fahr/maastro", str(site_dir)))
        return [str(bin_dir / words[0]), *words[1:]]

    def run(command: str) -> str:
        done = subprocess.run(argv(command), capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    # section 3's data: a semi-synthetic site, as the guide suggests for a dry run
    subprocess.run(
        [str(bin_dir / "fahr"), "cohort", "simulate", "--out", str(site_dir.parent), "--sizes", "60",
         "--mean-ages", "55", "--rates", "0.03", "--names", "maastro"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    run(commands[0])  # section 2: the key pair
    port = free_port()
    tls = create_server_tls(tmp_path / "certs", ["127.0.0.1"])
    (site_dir / "site.toml").write_text(
        f'[site]\nname = "maastro"\ndata = "."\nworkdir = "{SITE_WORKDIR}"\n'
        "[train]\nbatch_size = 16\nthreads = 1\n[alignment]\nworkers = 1\n"
        f'[connection]\nsuperlink = "127.0.0.1:{port}"\nroot_certificates = "{tls.ca_cert}"\n'
        'auth_key = "maastro.key"\n'
    )
    assert "site maastro: 60 patients" in run(commands[1])  # section 4
    assert "photos aligned" in run(commands[2])  # section 5

    server = tmp_path / "server.toml"
    server.write_text(
        f'[federation]\nrounds = 1\nmin_sites = 1\nport = {port}\nworkdir = "server"\n'
        f'join_timeout_s = 300\n[model]\narch = "vit_micro"\nfinetune = "last:1"\n'
        f'[security]\nca_cert = "{tls.ca_cert}"\n'
        f'server_cert = "{tls.cert}"\nserver_key = "{tls.key}"\nsite_keys = ["{site_dir / "maastro.pub"}"]\n'
    )
    coordinator = Managed(
        "fahr-server", [str(bin_dir / "fahr-server"), "run", "--config", str(server)], tmp_path / "server.log"
    )
    site = None
    try:
        deadline = time.monotonic() + 900
        # the coordinator guide's order: the site joins once its key is registered
        while not ServerWorkdir(tmp_path / "server").ready.exists() and time.monotonic() < deadline:
            assert coordinator.proc.poll() is None, coordinator.tail(40)
            time.sleep(0.5)
        site = Managed("fahr-client", argv(commands[3]), tmp_path / "site.log")  # section 6
        while coordinator.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        assert coordinator.proc.returncode == 0, coordinator.tail(40) + "\n--- site\n" + site.tail(40)
    finally:
        if site is not None:
            site.stop()
        coordinator.stop()
    assert SiteWorkdir(site_dir / SITE_WORKDIR).report_page.exists()
    status = run(commands[4])  # section 7
    assert "1 round(s) trained" in status and "chain intact, 3 record(s)" in status
    assert flower_processes_under(tmp_path) == []
