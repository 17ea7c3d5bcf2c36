"""The main job end to end: a real SuperLink and two real SuperNodes on 127.0.0.1, real faces."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fahr_core.config import load_server_config, load_site_config
from fahr_core.io import atomic_write_text
from fahr_core.models.checkpoint import load_weights
from fahr_core.models.initial import initial_model
from fahr_core.privacy.audit import verify_audit_log
from fahr_core.workdir import REPORT_SUMMARY, ServerWorkdir
from fahr_ops.flower import flower_env, start_supernode
from fahr_research.local import local_credentials, run_local_federation
from fahr_server.cli import run_federation
from tests.support import flower_processes_under, free_port, make_sites

pytestmark = pytest.mark.e2e


def test_two_sites_two_rounds(tmp_path, utkface):
    port = free_port()
    security, connections = local_credentials(tmp_path / "certs", ["site1", "site2"], port)
    tomls = make_sites(tmp_path / "sites", utkface, (50, 40), epsilon=4.0, connections=connections)
    server_toml = tmp_path / "server.toml"
    atomic_write_text(
        server_toml,
        f"""[federation]
rounds = 2
min_sites = 2
port = {port}
workdir = "server"
round_timeout_s = 600

[model]
arch = "vit_micro"

{security}""",
    )
    lines: list[str] = []
    code = run_local_federation(server_toml, tomls, echo=lines.append)
    assert code == 0, "\n".join(lines[-40:])

    work = tmp_path / "server"
    initial = initial_model(load_server_config(server_toml).model).state_dict()
    final = load_weights(ServerWorkdir(work).global_model)
    assert any(not torch.equal(final[k], initial[k]) for k in initial if initial[k].dtype.is_floating_point)
    assert sorted(p.name for p in ServerWorkdir(work).checkpoints.iterdir()) == [
        "global_round_001.safetensors",
        "global_round_002.safetensors",
    ]
    rounds = [json.loads(line) for line in ServerWorkdir(work).rounds_log.read_text().splitlines()]
    assert (
        [r["round"] for r in rounds] == [1, 2]
        and not any(r["rejected"] for r in rounds)
        and all(set(r["sites"]) == {"site1", "site2"} for r in rounds)
    )

    for toml in tomls:
        site = load_site_config(toml)
        ledger = json.loads(site.paths.ledger.read_text())
        assert 0 < ledger["epsilon"] <= site.privacy.epsilon * (1 + 1e-9)
        assert len(ledger["history"]) == 2
        summary = json.loads(site.paths.report_summary.read_text())
        assert summary["site"] == site.name and summary["n"] > 0
        assert "data:image/png;base64," in site.paths.report_page.read_text()
        assert verify_audit_log(site.paths.audit) == 4  # 2 trains, the evaluation admitted, its reply
        # the operator's console: this site's update in round 2, with the epsilon its ledger holds
        spent, budget = ledger["epsilon"], site.privacy.epsilon
        left = f"epsilon {spent:.3f} spent, {budget - spent:.3f} left of {budget:g}"
        update = f"round 2: update from {site.name}: {left}"
        assert any(line.endswith(update) for line in lines), "\n".join(lines)
    console = "\n".join(lines)
    events = (
        "round 1/2 started: 2 site(s) connected",
        "round 2: checkpoint",
        "round 2/2 done in",
        "report written:",
    )
    for event in events:
        assert event in console, console
    assert "INFO" not in console  # Flower's log went to run.log

    fed = json.loads((work / "report" / REPORT_SUMMARY).read_text())
    assert {s["site"] for s in fed["sites"]} == {"site1", "site2"}
    assert flower_processes_under(tmp_path) == []


def test_a_server_on_every_ipv6_interface_runs_a_round(tmp_path, utkface):
    """address = "::": Flower's SuperExec and fahr's own flwr calls dial ::1, which the certificate names."""
    port = free_port()
    security, connections = local_credentials(tmp_path / "certs", ["site1", "site2"], port)
    connections = {k: replace(c, superlink=f"[::1]:{port}") for k, c in connections.items()}
    tomls = make_sites(tmp_path / "sites", utkface, (30, 30), connections=connections)
    server_toml = tmp_path / "server.toml"
    atomic_write_text(
        server_toml,
        f'[federation]\nrounds = 1\nmin_sites = 2\naddress = "::"\nport = {port}\nworkdir = "server"\n'
        f'round_timeout_s = 600\n\n[model]\narch = "vit_micro"\n\n{security}',
    )
    lines: list[str] = []
    code = run_local_federation(server_toml, tomls, echo=lines.append)
    assert code == 0, "\n".join(lines[-40:])
    assert f"starting SuperLink on [::]:{port}" in "\n".join(lines)
    rounds = ServerWorkdir(tmp_path / "server").rounds_log.read_text().splitlines()
    assert [set(json.loads(r)["sites"]) for r in rounds] == [{"site1", "site2"}]
    assert flower_processes_under(tmp_path) == []


def test_unregistered_site_and_foreign_certificate_are_refused(tmp_path):
    """A site whose key the server never registered cannot join; nor can one trusting another CA."""
    port = free_port()
    security, _ = local_credentials(tmp_path / "certs", ["registered"], port)
    _, intruder = local_credentials(tmp_path / "intruder", ["site1"], port)  # other CA, unregistered key
    server_toml = tmp_path / "server.toml"
    atomic_write_text(
        server_toml,
        f"""[federation]
rounds = 1
min_sites = 1
port = {port}
workdir = "server"
round_timeout_s = 60

[model]
arch = "vit_micro"

{security}""",
    )
    # the right CA but a key the server never registered; then a certificate from another CA
    unregistered = replace(intruder["site1"], root_certificates=tmp_path / "certs" / "ca.crt")
    lines: list[str] = []

    def join_and_check() -> None:
        for connection, needle in (
            (unregistered, "No SuperNode found with the given public key"),
            (intruder["site1"], "CERTIFICATE_VERIFY_FAILED"),
        ):
            node = start_supernode(
                f"127.0.0.1:{port}",
                {"site": "site1"},
                free_port(),
                tmp_path / f"node-{needle[:3]}.log",
                flower_env(tmp_path / "fh"),
                connection,
            )
            try:
                node.proc.wait(timeout=60)
            finally:
                node.stop()
            assert node.proc.returncode != 0
            logs = node.tail(200) + ServerWorkdir(tmp_path / "server").superlink_log.read_text()
            assert needle in logs, needle
        raise KeyboardInterrupt  # stop the federation: nothing will join

    assert (
        run_federation(
            load_server_config(server_toml),
            server_toml,
            insecure=False,
            echo=lines.append,
            on_ready=join_and_check,
        )
        == 130
    )
    assert flower_processes_under(tmp_path) == []


def test_too_few_sites_fail_the_run_with_a_message(tmp_path, demo_site):
    port = free_port()
    server_toml = tmp_path / "server.toml"
    atomic_write_text(
        server_toml,
        f"""[federation]
rounds = 1
min_sites = 2
port = {port}
workdir = "server"
join_timeout_s = 15

[model]
arch = "vit_micro"
""",
    )
    lines: list[str] = []
    code = run_local_federation(server_toml, [demo_site], echo=lines.append, insecure=True)
    assert code != 0
    assert "only 1 of the 2 required sites connected" in "\n".join(lines)
    assert flower_processes_under(tmp_path) == []
