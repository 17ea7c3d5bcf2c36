"""The operator-facing commands: clear errors that name the file, row or key; nothing trains on bad data."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.config import ConfigError, load_server_config, load_site_config
from fahr_core.workdir import SITE_WORKDIR, SiteWorkdir
from fahr_server.cli import app as server_app

runner = CliRunner()


def test_check_accepts_a_good_site(demo_site):
    result = runner.invoke(client_app, ["check", "--site", "site1", "--config", str(demo_site)])
    assert result.exit_code == 0, result.output
    assert "60 patients" in result.output


def test_check_lists_every_bad_row_and_start_refuses(demo_site):
    csv = demo_site.parent / "cohort.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[2].split(",")
    row[header.index("time")] = "-1"
    lines[2] = ",".join(row)
    row = lines[5].split(",")
    row[header.index("photo")] = "photos/missing.jpg"
    lines[5] = ",".join(row)
    csv.write_text("\n".join(lines) + "\n")
    result = runner.invoke(client_app, ["check", "--site", "site1", "--config", str(demo_site)])
    assert result.exit_code == 1
    assert "cohort.csv line 3" in result.output and "negative" in result.output
    assert "cohort.csv line 6" in result.output and "missing.jpg" in result.output
    result = runner.invoke(client_app, ["start", "--site", "site1", "--config", str(demo_site), "--insecure"])
    assert result.exit_code == 1 and "will not join" in result.output
    assert not SiteWorkdir(demo_site.parent / SITE_WORKDIR).supernode_log.exists()


def test_site_name_must_match(demo_site):
    result = runner.invoke(client_app, ["check", "--site", "other", "--config", str(demo_site)])
    assert result.exit_code == 2 and "site1" in result.output


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[site]\nname = 'a'\n", "needs 'data'"),
        ("[site]\nname = 'a'\ndata = '.'\n[privacy]\nepsilon = -1\n", "[privacy].epsilon"),
        ("[site]\nname = 'a'\ndata = '.'\n[train]\nbatch_size = 'big'\n", "batch_size: expected int"),
        ("[site]\nname = 'a'\ndata = '.'\n[train]\nlr_typo = 1\n", "lr_typo"),
        ("[site\nname = 'a'", "not valid TOML"),
        ("[site]\nname = 'a'\ndata = '.'\n[train]\nloss = 'cox_efron'\n", "couples patients"),
    ],
)
def test_site_config_errors_name_the_key(tmp_path, text, needle):
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_server_config_errors_name_the_key(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[federation]\nrounds = 0\n")
    with pytest.raises(ConfigError, match=r"\[federation\].rounds"):
        load_server_config(path)
    path.write_text("[model]\narch = 'vit_huge'\n")
    with pytest.raises(ConfigError, match=r"\[model\].arch"):
        load_server_config(path)
    path.write_text("[model]\nencoder_checkpoint = 'mae.safetensors'\n")
    with pytest.raises(ConfigError, match=r"encoder_checkpoint .*mae.safetensors not found"):
        load_server_config(path)
    path.write_text("[federation]\naggregation = 'mean'\n")
    with pytest.raises(ConfigError, match=r"\[federation\].aggregation must be one of fedavg, median"):
        load_server_config(path)
    path.write_text("[federation]\naggregation = 'krum'\nsecure_aggregation = true\n")
    with pytest.raises(ConfigError, match=r"'krum' needs each site's update, which secure aggregation hides"):
        load_server_config(path)
    for line, match in (
        ("address = ''", r"\[federation\].address must be a host name or IP address"),
        ("address = 'fahr.example.org:8443'", r"without a port"),
        ("address = '::'", None),  # every IPv6 interface
        ("address = '[::1]'", r"without a port or brackets"),
        ("address = '::1'", None),
        ("address = 'fahr.example.org'", None),
        ("address = 'fahr example'", r"\[federation\].address must be"),
        ("port = 0", r"\[federation\].port must be a whole number in 1..65535, not 0"),
        ("port = 70000", r"\[federation\].port must be"),
        ("port = '8443'", r"\[federation\].port"),
    ):
        path.write_text(f"[federation]\n{line}\n")
        if match is None:
            load_server_config(path)
            continue
        with pytest.raises(ConfigError, match=match):
            load_server_config(path)
    path.write_text("[model]\narch = 'vit_huge'\n")
    result = runner.invoke(server_app, ["run", "--config", str(path), "--insecure"])
    assert result.exit_code == 2 and "[model].arch" in result.output
