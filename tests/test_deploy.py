"""The deployment examples in deploy/ are real configs: they load, and say what the docs say."""

from __future__ import annotations

import shutil
from pathlib import Path

from fahr_core.config import load_server_config, load_site_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_example_server_config_loads_with_its_models_in_place(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "server.toml", tmp_path / "server.toml")
    (tmp_path / "models").mkdir()
    for name in ("encoder-b.safetensors", "age-b.safetensors"):
        (tmp_path / "models" / name).write_bytes(b"")  # the loader checks they exist, not their weights
    cfg = load_server_config(tmp_path / "server.toml")
    assert cfg.secure_aggregation and cfg.aggregation == "fedavg" and cfg.min_sites == 3
    assert cfg.model.arch == "vit_base" and cfg.model.encoder_checkpoint.endswith("encoder-b.safetensors")
    assert cfg.security is not None and len(cfg.security.site_keys) == 3
    assert cfg.security.ca_cert == (tmp_path / "certs" / "ca.crt").resolve()


def test_example_site_config_loads() -> None:
    cfg = load_site_config(DEPLOY / "site.toml")
    assert cfg.name == "maastro" and cfg.train.loss == "discrete_hazard"
    assert cfg.connection.auth_key == (DEPLOY / "keys" / "maastro.key").resolve()


def test_units_start_the_installed_commands_and_kill_their_process_groups() -> None:
    for unit, command in (
        ("fahr-server.service", "fahr-server run"),
        ("fahr-client@.service", "fahr-client start"),
    ):
        text = (DEPLOY / "systemd" / unit).read_text()
        assert command in text and "KillMode=control-group" in text
        assert "FLWR_TELEMETRY_ENABLED=0" in text
