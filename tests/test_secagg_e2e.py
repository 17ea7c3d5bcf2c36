"""Secure aggregation end to end: a real SuperLink and three real SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import demo_faces_dir
from fahr_core.config import load_server_config, load_site_config
from fahr_core.io import atomic_write_text
from fahr_core.models.checkpoint import load_weights
from fahr_core.privacy.audit import verify_audit_log
from fahr_core.privacy.randomness import TEST_RNG_ENV
from fahr_core.workdir import ServerWorkdir
from fahr_research.local import run_local_federation
from fahr_server.app import global_start
from tests.support import flower_processes_under, free_port, make_sites

pytestmark = pytest.mark.e2e


def test_three_sites_one_round_secure_sum_is_their_fedavg(tmp_path, monkeypatch):
    """The server's new weights are the FedAvg of what each site trained, though it saw only masked updates.

    Under the test-only switch (FAHR_INSECURE_TEST_RNG, inherited by the site processes) site
    training is reproducible, so each site's round-1 weights are computed here first, in this
    process, from the same initial model; the site's privacy ledger is then reset so the
    federation trains the same round again. The sites fine-tune LoRA adapters: only the adapters
    and the head are masked and summed, the frozen base never changes.
    """
    monkeypatch.setenv(TEST_RNG_ENV, "11")
    port = free_port()
    tomls = make_sites(tmp_path / "sites", demo_faces_dir(), (100, 90, 90))
    server_toml = tmp_path / "server.toml"
    atomic_write_text(
        server_toml,
        f"""[federation]
rounds = 1
min_sites = 3
port = {port}
workdir = "server"
round_timeout_s = 600
secure_aggregation = true

[model]
arch = "vit_micro"
finetune = "lora"
""",
    )
    global_model, initial = global_start(load_server_config(server_toml))
    trained, sizes = [], []
    for toml in tomls:
        site = SiteRuntime(load_site_config(toml))
        state, metrics = site.train_round(global_model.outgoing(initial, True), global_model.spec, 1, 1)
        trained.append(state)
        sizes.append(metrics["num-examples"])
        site.cfg.paths.ledger.unlink()
    fedavg = {
        k: sum(n * s[k].double() for n, s in zip(sizes, trained, strict=True)) / sum(sizes) for k in initial
    }

    lines: list[str] = []
    code = run_local_federation(server_toml, tomls, echo=lines.append, insecure=True)
    assert code == 0, "\n".join(lines[-40:])

    work = tmp_path / "server"
    final = load_weights(ServerWorkdir(work).checkpoint(1))  # unmerged: adapters apart
    assert all(torch.equal(final[k], v) for k, v in global_model.base.items())
    moved = max((fedavg[k] - initial[k].double()).abs().max().item() for k in initial)
    error = max((final[k].double() - fedavg[k]).abs().max().item() for k in initial)
    assert moved > 1e-4  # training moved the weights far more than the tolerance below
    assert error < 1e-6, error  # quantisation (< 1e-8 here) plus float32 rounding of the result

    (record,) = [json.loads(line) for line in ServerWorkdir(work).rounds_log.read_text().splitlines()]
    assert set(record["sites"]) == {"site1", "site2", "site3"}
    assert record["secure_aggregation"]["sites"] == 3
    assert record["secure_aggregation"]["dropped_after_keys"] == 0
    assert record["secure_aggregation"]["max_abs_error"] < 1e-8

    for toml in tomls:
        site = load_site_config(toml)
        assert verify_audit_log(site.paths.audit) == 6  # keys, share, mask, unmask, admitted, evaluate
        records = [json.loads(line) for line in site.paths.audit.read_text().splitlines()]
        sent = {r["kind"]: {t["name"].split("/")[1] for t in r["tensors"]} for r in records}
        assert sent["train"] == {"enc-pk", "mask-pk"}  # no weights left the site
        assert sent["train.secagg_mask"] == {"masked"}
        assert all(t["name"].startswith("secagg/") for r in records[:4] for t in r["tensors"])
    assert flower_processes_under(tmp_path) == []
