"""Operations as the coordinator guide documents them: a wildcard address behind a DNS-named
certificate, a workdir after a failed first round, removing a site, certificate renewal, the units.

Each test that starts a SuperLink stops right after the site keys are registered (`on_ready`),
so no federation runs: seconds, not minutes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.config import load_server_config
from fahr_core.release import fahr_version
from fahr_core.workdir import ServerWorkdir
from fahr_ops.certs import create_server_tls, create_site_keys
from fahr_ops.flower import console_script, flower_env, local_address
from fahr_research.cli import app as tools_app
from fahr_server.cli import app as server_app
from fahr_server.cli import run_federation
from fahr_server.state import FederationState, model_record, write_state
from tests.support import flower_processes_under, free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _server_toml(folder: Path, address: str, port: int, security: str = "") -> Path:
    toml = folder / "server.toml"
    toml.write_text(
        f'[federation]\nrounds = 2\nmin_sites = 1\naddress = "{address}"\nport = {port}\n'
        f'workdir = "server"\n[model]\narch = "vit_micro"\n{security}'
    )
    return toml


def _security(certs: Path, hosts: list[str], sites: list[str]) -> str:
    tls = create_server_tls(certs, hosts)
    keys = ", ".join(f'"{create_site_keys(certs / "sites", s)[1]}"' for s in sites)
    return (
        f'[security]\nca_cert = "{tls.ca_cert}"\nserver_cert = "{tls.cert}"\n'
        f'server_key = "{tls.key}"\nsite_keys = [{keys}]\n'
    )


def _until_registered(toml: Path, insecure: bool = False) -> tuple[int, list[str]]:
    """Run the federation command until the SuperLink is up and the sites are registered."""
    lines: list[str] = []

    def stop() -> None:
        raise KeyboardInterrupt

    code = run_federation(load_server_config(toml), toml, insecure, lines.append, stop)
    deadline = time.monotonic() + 15  # Flower's SuperExec notices its parent is gone within seconds
    while flower_processes_under(toml.parent) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes_under(toml.parent) == []
    return code, lines


@pytest.mark.parametrize(("wildcard", "dialled"), [("0.0.0.0", "127.0.0.1:{}"), ("::", "[::1]:{}")])
def test_wildcard_address_with_a_certificate_for_the_dns_name_only(
    tmp_path: Path, wildcard: str, dialled: str
) -> None:
    security = _security(tmp_path / "certs", ["localhost"], ["maastro"])
    toml = _server_toml(tmp_path, wildcard, free_port(), security)
    cfg = load_server_config(toml)
    # Flower's own SuperExec dials 127.0.0.1 and checks the certificate against it, so fahr's
    # certificate names the loopback addresses beside the DNS name it was asked for
    cert = x509.load_pem_x509_certificate(Path(cfg.security.server_cert).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert local_address(cfg.address, cfg.port) == dialled.format(cfg.port)
    code, lines = _until_registered(toml)  # the site keys are registered through that address
    assert code == 130 and "registered 1 site key(s)" in "\n".join(lines), lines


def test_wildcard_address_refuses_a_certificate_without_the_loopback_address(tmp_path: Path) -> None:
    # a certificate made elsewhere, for the DNS name only: the ServerApp would never start
    security = _security(tmp_path / "certs", ["localhost"], ["maastro"])
    certs = tmp_path / "certs"
    ca_cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    foreign = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    (certs / "server.crt").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    toml = _server_toml(tmp_path, "0.0.0.0", free_port(), security)
    lines: list[str] = []
    assert run_federation(load_server_config(toml), toml, False, lines.append) == 2
    assert "server.crt" in lines[-1] and "127.0.0.1" in lines[-1], lines
    assert not ServerWorkdir(tmp_path / "server").superlink_log.exists()  # refused before starting


def test_a_failed_first_round_leaves_a_workdir_a_fresh_run_accepts(tmp_path: Path) -> None:
    toml = _server_toml(tmp_path, "127.0.0.1", free_port())
    work = tmp_path / "server"
    work.mkdir()
    failed = {"round": 1, "sites": {}, "rejected": {}, "failures": {"site1": "node 2 is unavailable"}}
    ServerWorkdir(work).rounds_log.write_text(json.dumps(failed) + "\n")
    ServerWorkdir(work).events_log.write_text(
        '{"at": 1, "kind": "run_failed", "reason": "round 1: only 0"}\n'
    )

    lines: list[str] = []
    assert run_federation(load_server_config(toml), toml, True, lines.append, resume=True) == 2
    assert "nothing to resume" in lines[-1] and "without --resume" in lines[-1]

    code, lines = _until_registered(toml, insecure=True)
    assert code == 130, lines  # it got as far as submitting the run
    (aside,) = work.glob("uncommitted-*")
    assert json.loads(ServerWorkdir(aside).rounds_log.read_text())["failures"] == failed["failures"]
    assert not ServerWorkdir(work).rounds_log.exists() and f"kept in {aside}" in "\n".join(lines)


@pytest.mark.slow
def test_a_site_removed_from_site_keys_is_unregistered(tmp_path: Path) -> None:
    port = free_port()
    security = _security(tmp_path / "certs", ["127.0.0.1"], ["maastro", "leiden"])
    toml = _server_toml(tmp_path, "127.0.0.1", port, security)
    assert _until_registered(toml)[0] == 130
    both = json.loads(ServerWorkdir(tmp_path / "server").registered_sites.read_text())
    assert len(both) == 2

    leiden = next(entry for entry in both.values() if entry["key"].endswith("leiden.pub"))
    maastro = next(entry for entry in both.values() if entry["key"].endswith("maastro.pub"))
    toml.write_text(toml.read_text().replace(f', "{leiden["key"]}"', ""))
    code, lines = _until_registered(toml)
    unregistered = f"unregistered {leiden['key']} (SuperNode {leiden['node']}): not in [security].site_keys"
    assert code == 130 and unregistered in lines, lines
    assert list(json.loads(ServerWorkdir(tmp_path / "server").registered_sites.read_text()).values()) == [
        maastro
    ]
    # and the SuperLink agrees: of the two SuperNodes registered, only maastro's is left
    assert _supernodes(tmp_path / "server", toml) == [str(maastro["node"])]


def _supernodes(work: Path, toml: Path) -> list[str]:
    """The SuperLink's own list of registered SuperNodes (a SuperLink is started for the question)."""
    from fahr_ops.flower import start_superlink, write_cli_connection

    cfg = load_server_config(toml)
    env = flower_env(ServerWorkdir(work).flwr_home)
    write_cli_connection(ServerWorkdir(work).flwr_home, local_address(cfg.address, cfg.port), cfg.security)
    db, log = ServerWorkdir(work).superlink_db, ServerWorkdir(work).superlink_log
    link = start_superlink(cfg.address, cfg.port, db, log, env, cfg.security)
    try:
        out = subprocess.run(
            [console_script("flwr"), "supernode", "list", "fahr", "--format", "json"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        link.stop()
    return sorted(n["node-id"] for n in json.loads(out.stdout)["nodes"] if n["status"] != "unregistered")


def test_certs_renew_keeps_the_ca_and_the_hosts_and_extends_the_validity(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    create_server_tls(certs, ["fahr.example.org", "10.0.0.5"], days=30)
    ca_before = (certs / "ca.crt").read_bytes()
    old = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    out = CliRunner().invoke(tools_app, ["certs", "renew", "--out", str(certs), "--days", "825"])
    assert out.exit_code == 0, out.output
    new = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans == old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert new.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=824)
    new.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    # the CA expired before the new certificate would: re-issued with the same key, so ca.crt changed
    assert ca.not_valid_after_utc >= new.not_valid_after_utc and (certs / "ca.crt").read_bytes() != ca_before
    assert ca.public_key() == x509.load_pem_x509_certificate(ca_before).public_key()
    assert f"give the new {certs / 'ca.crt'} to every site" in out.output


def test_certs_renew_refuses_a_folder_without_the_ca_key(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    create_server_tls(certs, ["fahr.example.org"])
    (certs / "ca.key").unlink()
    out = CliRunner().invoke(tools_app, ["certs", "renew", "--out", str(certs)])
    assert out.exit_code == 2 and f"{certs / 'ca.key'}" in out.output


@pytest.mark.parametrize("unit", ["fahr-server.service", "fahr-client@.service"])
def test_units_restart_after_a_crash_as_the_guides_say(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "Restart=on-failure" in text and "Restart=no" not in text


def test_auto_resume_continues_only_what_can_be_continued(tmp_path: Path) -> None:
    """The server unit's --auto-resume: a finished run is not started again (exit 2, which the unit
    does not restart); with no run recorded it would start a fresh one."""
    toml = _server_toml(tmp_path, "127.0.0.1", free_port())
    cfg = load_server_config(toml)
    cfg.workdir.mkdir()
    write_state(cfg.workdir, FederationState(2, 2, "checkpoints/x", "", fahr_version(), model_record(cfg)))
    out = CliRunner().invoke(server_app, ["run", "-c", str(toml), "--insecure", "--auto-resume"])
    assert out.exit_code == 2 and "nothing to resume: all 2 rounds completed" in out.output
    unit = (DEPLOY / "systemd" / "fahr-server.service").read_text()
    assert "--auto-resume" in unit and "RestartPreventExitStatus=2" in unit


def test_a_second_site_on_the_host_is_told_the_runtime_port_is_taken(demo_site: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = CliRunner().invoke(
            client_app,
            ["start", "--site", "site1", "-c", str(demo_site), "--insecure", "--runtime-port", str(port)],
        )
    assert out.exit_code == 2 and f"runtime port {port} is in use" in out.output
