"""Neither end runs without TLS and authentication unless told to, and then only on loopback.

Each refusal exits with code 2 and a message that says what is missing; none starts a process.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.config import ConfigError, load_server_config
from fahr_core.workdir import SITE_WORKDIR, ServerWorkdir, SiteWorkdir
from fahr_server.cli import app as server_app
from tests.support import free_port

runner = CliRunner()


def _server_toml(tmp_path, address: str = "127.0.0.1", security: str = "") -> str:
    path = tmp_path / "server.toml"
    path.write_text(
        f'[federation]\naddress = "{address}"\nport = {free_port()}\nworkdir = "run"\n'
        f'\n[model]\narch = "vit_micro"\n{security}'
    )
    return str(path)


def test_a_server_without_a_security_table_refuses_to_start(tmp_path):
    result = runner.invoke(server_app, ["run", "--config", _server_toml(tmp_path)])
    assert result.exit_code == 2
    assert "has no [security] table" in result.output and "fahr certs init" in result.output
    assert not ServerWorkdir(tmp_path / "run").superlink_log.exists()


@pytest.mark.parametrize("address", ["0.0.0.0", "10.1.2.3", "fahr.example.org"])
def test_a_server_refuses_insecure_off_loopback(tmp_path, address):
    result = runner.invoke(server_app, ["run", "--config", _server_toml(tmp_path, address), "--insecure"])
    assert result.exit_code == 2
    assert f"--insecure is for loopback tests only, not for address {address}" in result.output
    assert not (tmp_path / "run").exists()


def test_a_security_table_needs_the_ca_and_the_server_certificate_and_key(tmp_path):
    for missing in ("ca_cert", "server_cert", "server_key"):
        keys = {"ca_cert": "ca.crt", "server_cert": "server.crt", "server_key": "server.key"}
        del keys[missing]
        table = "\n[security]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items())
        with pytest.raises(ConfigError, match=rf"\[security\].{missing} is required"):
            load_server_config(_server_toml(tmp_path, security=table))


def _start(toml, *extra: str):
    return runner.invoke(client_app, ["start", "--site", "site1", "--config", str(toml), *extra])


@pytest.mark.parametrize("superlink", ["10.1.2.3:9092", "0.0.0.0:9092", "fahr.example.org:9092"])
def test_a_site_refuses_insecure_off_loopback(demo_site, superlink):
    result = _start(demo_site, "--insecure", "--superlink", superlink)
    assert result.exit_code == 2
    assert f"--insecure is for loopback tests only, not for {superlink}" in result.output


@pytest.mark.parametrize(
    ("connection", "missing"),
    [
        ("", "root_certificates and auth_key"),
        ('root_certificates = "ca.crt"\n', "auth_key"),
        ('auth_key = "site1.key"\n', "root_certificates"),
    ],
)
def test_a_site_without_the_ca_or_its_key_refuses_to_join(demo_site, connection, missing):
    for name in ("ca.crt", "site1.key"):  # the file that is named exists; the other is not named
        (demo_site.parent / name).write_text("placeholder\n")
    text = demo_site.read_text().replace('root_certificates = ""\n', "").replace('auth_key = ""\n', "")
    demo_site.write_text(text.replace("[connection]\n", f"[connection]\n{connection}"))
    result = _start(demo_site)
    assert result.exit_code == 2
    assert f"[connection] needs {missing} (the federation's ca.crt" in result.output
    assert not SiteWorkdir(demo_site.parent / SITE_WORKDIR).supernode_log.exists()
