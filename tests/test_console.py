"""The operator's console: one line per event, `fahr-server status` and `fahr-client status`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.config import load_site_config
from fahr_core.privacy.audit import append_audit
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.workdir import ServerWorkdir
from fahr_server.cli import app as server_app
from fahr_server.events import describe, emit, emit_round, end_of_log, follow, read_events
from fahr_server.state import FederationState, write_state
from fahr_server.strategy import TooFewSites

ROUND_1 = {
    "round": 1,
    "sites": {
        "maastro": {"num-examples": 40, "epsilon": 1.5, "epsilon-budget": 8.0, "noise-multiplier": 1.1},
        "leiden": {"num-examples": 60, "epsilon": 2.25, "epsilon-budget": 4.0, "noise-multiplier": 0.9},
    },
    "rejected": {"boston": "non-finite values in blocks.0.attn.qkv.weight"},
    "failures": {"node-7": "node 7 is unavailable"},
}


def _lines(work: Path) -> list[str]:
    return [describe(e).split("  ", 1)[1] for e in read_events(work)]


def test_each_site_update_is_one_line_with_its_own_epsilon_spent_and_left(tmp_path: Path) -> None:
    seen: set[str] = set()
    emit(tmp_path, "round_started", round=1, rounds=3, connected=4)
    emit_round(tmp_path, ROUND_1, seen)
    emit_round(tmp_path, {**ROUND_1, "round": 2, "rejected": {}, "failures": {}}, seen)
    lines = _lines(tmp_path)
    assert lines[:7] == [
        "round 1/3 started: 4 site(s) connected",
        "site maastro joined (its first update arrived)",
        "round 1: update from maastro: epsilon 1.500 spent, 6.500 left of 8",
        "site leiden joined (its first update arrived)",
        "round 1: update from leiden: epsilon 2.250 spent, 1.750 left of 4",
        "round 1: update from boston REJECTED: non-finite values in blocks.0.attn.qkv.weight",
        "round 1: site node-7 FAILED: node 7 is unavailable",
    ]
    assert sum("joined" in line for line in lines) == 2  # a site joins once, not every round
    # noise multipliers and example counts stay out of the console: budgets only, per site
    assert "noise" not in ServerWorkdir(tmp_path).events_log.read_text()


def test_the_console_follows_only_new_whole_events(tmp_path: Path) -> None:
    emit(tmp_path, "report_written", path="old/report.html")  # an earlier run's, already shown
    start = end_of_log(tmp_path)
    emit(tmp_path, "checkpoint_written", round=1, path="checkpoints/global_round_001.safetensors")
    with ServerWorkdir(tmp_path).events_log.open("a") as f:
        f.write('{"kind": "round_done", "round"')  # the server is writing this one right now
    got = [e["kind"] for e in follow(tmp_path, start, stop=lambda: True)]
    assert got == ["checkpoint_written"]


def test_server_status_of_a_stopped_then_a_finished_federation(tmp_path: Path) -> None:
    work = tmp_path / "work"
    toml = tmp_path / "server.toml"
    toml.write_text(f'[federation]\nrounds = 3\nworkdir = "{work}"\n[model]\narch = "vit_micro"\n')
    runner = CliRunner()
    assert "no federation has run here yet" in runner.invoke(server_app, ["status", "-c", str(toml)]).output

    work.mkdir()
    write_state(work, FederationState(1, 3, "checkpoints/global_round_001.safetensors", "", "v", {}))
    emit(work, "round_started", round=1, rounds=3, connected=2)
    emit_round(work, ROUND_1, set())
    emit(work, "round_started", round=2, rounds=3, connected=1)
    stopped = TooFewSites("only 1 of the 2 required sites connected within 600 s")
    emit(work, "run_failed", reason=str(stopped))
    out = runner.invoke(server_app, ["status", "-c", str(toml)]).output
    assert "stopped after 1 of 3 completed rounds: only 1 of the 2 required sites connected" in out
    assert "round 1: update from leiden: epsilon 2.250 spent, 1.750 left of 4" in out
    assert "  leiden: epsilon 2.250 spent, 1.750 left of 4" in out  # the per-site privacy table

    emit(work, "round_started", round=2, rounds=3, connected=2)  # resumed
    assert (
        "running or interrupted: 1 of 3 rounds completed"
        in runner.invoke(server_app, ["status", "-c", str(toml)]).output
    )
    ServerWorkdir(work).run_summary.write_text(json.dumps({"rounds": 3, "completed_rounds": [1, 2, 3]}))
    assert (
        "finished: 3 of 3 rounds completed" in runner.invoke(server_app, ["status", "-c", str(toml)]).output
    )


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP accountant fed step by step, as DP-SGD would: the reference for the ledger's total."""
    acc = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


def test_site_status_shows_the_ledger_per_run_and_round_and_checks_the_audit_chain(
    tmp_path: Path, demo_site: Path
) -> None:
    cfg = load_site_config(demo_site)
    delta = 1e-3
    ledger = PrivacyLedger.open(cfg.paths.ledger, cfg.privacy.epsilon, delta)
    steps = [(1.2, 0.25, 4), (1.0, 0.25, 4), (0.9, 0.25, 4)]
    for (server_round, run_id), step in zip([(1, 11), (2, 11), (1, 12)], steps, strict=True):
        eps = ledger.record(step, {"server_round": server_round, "num_rounds": 2})
        append_audit(cfg.paths.audit, "train", server_round, run_id, {"w": torch.zeros(2)}, {"epsilon": eps})
        if (server_round, run_id) == (2, 11):  # run 11's final evaluation repeats its epsilon
            append_audit(cfg.paths.audit, "evaluate", 2, 11, {}, {"epsilon": eps, "c-index": 0.6})
    total = _rdp_epsilon(steps, delta)
    after_run_11 = _rdp_epsilon(steps[:2], delta)

    out = CliRunner().invoke(client_app, ["status", "--site", cfg.name, "-c", str(demo_site)]).output
    spent = float(out.split("privacy: epsilon ")[1].split()[0])
    left = float(out.split("), ")[1].split()[0])
    assert math.isclose(spent, total, abs_tol=1e-3) and math.isclose(
        left, cfg.privacy.epsilon - total, abs_tol=2e-3
    )
    assert "3 round(s) trained" in out and "round 2/2: noise multiplier 1.000, 4 steps" in out
    assert f"run 11: rounds 1, 2; epsilon +{after_run_11:.3f} -> {after_run_11:.3f}" in out
    assert f"run 12: rounds 1; epsilon +{total - after_run_11:.3f} -> {total:.3f}" in out
    assert "outbound audit log: chain intact, 4 record(s)" in out

    lines = cfg.paths.audit.read_text().splitlines()
    cfg.paths.audit.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a line removed
    out = CliRunner().invoke(client_app, ["status", "--site", cfg.name, "-c", str(demo_site)]).output
    assert "outbound audit log: BROKEN" in out and "line 2: chain broken" in out


def test_site_status_before_anything_was_spent(tmp_path: Path, demo_site: Path) -> None:
    cfg = load_site_config(demo_site)
    out = CliRunner().invoke(client_app, ["status", "--site", cfg.name, "-c", str(demo_site)]).output
    assert (
        f"privacy: nothing spent yet (no ledger at {cfg.paths.ledger}); budget {cfg.privacy.epsilon:g}" in out
    )
