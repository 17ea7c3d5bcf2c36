"""Fault injection with real SuperLink and SuperNode processes on 127.0.0.1 (issue #5).

The server crashes after round 1 and resumes; a site dies mid-round and restarts; compromised
sites send a NaN and an oversized update. Compromised sites are simulated in the test only: a
`sitecustomize.py` on the sites' PYTHONPATH patches the ClientApp process (FAHR_TEST_FAULTS).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import demo_faces_dir
from fahr_core.config import load_server_config, load_site_config
from fahr_core.io import atomic_write_text
from fahr_core.models.checkpoint import load_weights, save_weights
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.privacy.randomness import TEST_RNG_ENV
from fahr_core.release import fahr_version
from fahr_core.workdir import ServerWorkdir
from fahr_ops.flower import console_script
from fahr_ops.processes import Managed, free_local_port
from fahr_research.local import local_credentials, run_local_federation, start_site
from fahr_server.app import global_start
from fahr_server.cli import run_federation
from fahr_server.state import (
    FederationState,
    file_sha256,
    model_record,
    read_state,
    state_key_path,
    trim_rounds_log,
    write_state,
)
from fahr_server.strategy import TooFewSites, robust_aggregator
from tests.support import (
    crash_processes_under,
    fahr_strategy,
    flower_processes_under,
    free_port,
    live_groups,
    make_sites,
    process_groups_under,
    train_reply,
)

# Loaded by every Python process of a site; acts only in the ClientApp process (one per message).
# A fault per site and round: "nan" (a NaN weight), "scale" (the update times 1000), both sent past
# the site's own outbound gate as a compromised site would; "fail-unless:PATH" (refuse the round
# until PATH exists, before training or touching the privacy ledger); "wait-for:PATH" (start
# training only once PATH exists).
SITECUSTOMIZE = """
import importlib.util, json, os, sys, time

FAULTS = json.loads(os.environ.get("FAHR_TEST_FAULTS", "{}"))


def compromise(client_app):
    import torch
    from fahr_client import runtime as core_site

    original_train = core_site.SiteRuntime.train_round

    def train_round(self, state, spec, server_round, num_rounds, *server_record):
        fault = FAULTS.get(self.cfg.name, {}).get(str(server_round), "")
        if fault.startswith("fail-unless:") and not os.path.exists(fault.split(":", 1)[1]):
            raise RuntimeError(f"test fault: site {self.cfg.name} refuses round {server_round}")
        while fault.startswith("wait-for:") and not os.path.exists(fault.split(":", 1)[1]):
            time.sleep(0.2)
        new, metrics = original_train(self, state, spec, server_round, num_rounds, *server_record)
        if fault == "nan":
            name = next(k for k, v in new.items() if v.dtype.is_floating_point)
            new[name] = torch.full_like(new[name], float("nan"))
        elif fault == "scale":
            new = {k: state[k] + 1000 * (v - state[k]) if v.dtype.is_floating_point else v
                   for k, v in new.items()}
        if fault in ("nan", "scale"):
            client_app.check_outbound = lambda *args: None
        return new, metrics

    core_site.SiteRuntime.train_round = train_round


class PatchOnImport:
    # Patch fahr_client.app when the ClientApp process imports it, not at start-up: the process
    # must reach its SuperNode before its task token expires.

    def find_spec(self, name, path, target=None):
        if name != "fahr_client.app":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            compromise(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULTS:
    sys.meta_path.insert(0, PatchOnImport())
"""


def inject_faults(tmp_path: Path, monkeypatch, faults: dict[str, dict[str, str]]) -> None:
    """Processes started from now on load the fault-injecting sitecustomize with `faults`."""
    folder = tmp_path / "compromised"
    atomic_write_text(folder / "sitecustomize.py", SITECUSTOMIZE)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("FAHR_TEST_FAULTS", json.dumps(faults))


def server_toml(folder: Path, port: int, rounds: int, min_sites: int, security: str = "") -> Path:
    path = folder / "server.toml"
    atomic_write_text(
        path,
        f"""[federation]
rounds = {rounds}
min_sites = {min_sites}
port = {port}
workdir = "server"
round_timeout_s = 600
join_timeout_s = 120

[model]
arch = "vit_micro"

{security}""",
    )
    return path


def rounds_log(work: Path) -> list[dict]:
    return [json.loads(line) for line in ServerWorkdir(work).rounds_log.read_text().splitlines()]


def wait_for(condition, timeout_s: float, what: str, alive: Managed | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if alive is not None and not alive.running:
            raise AssertionError(f"{alive.name} exited while waiting for {what}:\n{alive.tail(40)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def ledger_of(toml: Path) -> PrivacyLedger:
    site = load_site_config(toml)
    raw = json.loads(site.paths.ledger.read_text())
    return PrivacyLedger.open(site.paths.ledger, raw["budget"], raw["delta"])


def test_a_round_completes_with_the_sites_that_replied_and_commits_its_state(tmp_path):
    strategy = fahr_strategy(tmp_path, last_round=1)  # resumed after round 1: Flower's round 1 is round 2
    replies = [
        train_reply(1, "a", {"w": torch.ones(4)}),
        train_reply(2, "b", {"w": torch.ones(4) * 3}),
        train_reply(3),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((4,), 2.0))
    (record,) = rounds_log(tmp_path)
    assert record["round"] == 2 and set(record["sites"]) == {"a", "b"}
    assert record["failures"] == {"node-3": "node 3 is unavailable"}  # never replied: name unknown
    state = read_state(tmp_path)
    assert (state.last_round, state.site_epsilon) == (2, {"a": 1.5, "b": 1.5})
    assert state.checkpoint_sha256 == file_sha256(ServerWorkdir(tmp_path).checkpoint(2))


def test_too_few_usable_updates_fail_the_round_naming_the_sites(tmp_path):
    strategy = fahr_strategy(tmp_path)
    strategy.aggregate_train(
        1, [train_reply(1, "a", {"w": torch.ones(4)}), train_reply(2, "b", {"w": torch.ones(4)})]
    )
    nan = {"w": torch.full((4,), float("nan"))}
    with pytest.raises(
        TooFewSites, match=r"round 2: only 0 of the 2 required sites.*'a': 'node 1 is unavail"
    ):
        strategy.aggregate_train(2, [train_reply(1), train_reply(2, "b", nan)])
    assert read_state(tmp_path).last_round == 1  # the failed round is not committed
    assert read_state(tmp_path).rejections == {}
    assert "non-finite" in ServerWorkdir(tmp_path).rejections_log.read_text()


def test_screening_is_keyed_by_the_sending_node_not_the_declared_name(tmp_path):
    """A NaN update declared as site a, with another node also declaring a: both are rejected,
    whatever order they come in, and the global model is the mean of the others."""
    nan, ones = {"w": torch.full((4,), float("nan"))}, {"w": torch.ones(4)}
    strategy = fahr_strategy(tmp_path)
    with pytest.raises(TooFewSites, match="only 1 of the 2 required"):  # [a: NaN, a: ones, b: ones]
        strategy.aggregate_train(
            1, [train_reply(1, "a", nan), train_reply(2, "a", ones), train_reply(3, "b", ones)]
        )
    assert read_state(tmp_path) is None  # nothing committed, NaN or otherwise
    rejected = rounds_log(tmp_path)[0]["rejected"]
    assert rejected == {
        "a (node 1)": "2 nodes declared site 'a'",
        "a (node 2)": "2 nodes declared site 'a'",
    }
    three = {"w": torch.full((4,), 3.0)}
    replies = [
        train_reply(2, "a", ones),
        train_reply(1, "a", nan),
        train_reply(3, "b", ones),
        train_reply(4, "c", three),
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((4,), 2.0))
    twice = [
        train_reply(3, "b", ones),
        train_reply(3, "d", three),
        train_reply(1, "a", ones),
        train_reply(4, "c", ones),
    ]
    arrays, _ = strategy.aggregate_train(3, twice)
    assert rounds_log(tmp_path)[-1]["rejected"] == {"node 3": "2 replies from one node (as b, d)"}
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.ones(4))
    evaluations = [
        train_reply(1, "a", ones),
        train_reply(2, "a", ones),
        train_reply(3, "b", ones),
        train_reply(4, "c", ones),
    ]
    strategy.aggregate_evaluate(3, [*evaluations, train_reply(4, "d", ones)])  # evaluations likewise
    assert [e["site"] for e in strategy.site_evaluations] == ["b"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("fedavg", 3.7), ("median", 3.0), ("trimmed_mean", (2 + 3 + 3.5) / 3), ("krum", 3.0)],
)
def test_robust_aggregation_limits_a_poisoned_update_that_passes_screening(tmp_path, rule, expected):
    """Five sites, one pulling the model to 9: its update is within 5x the median norm, so only the
    aggregation rule can limit it (Krum keeps the update nearest its neighbours: 3)."""
    strategy = fahr_strategy(
        tmp_path, aggregator=robust_aggregator(rule, trim_fraction=0.2, krum_malicious=1)
    )
    values = (1.0, 2.0, 3.0, 3.5, 9.0)
    replies = [train_reply(n, f"s{n}", {"w": torch.full((4,), v)}) for n, v in enumerate(values, start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert rounds_log(tmp_path)[0]["rejected"] == {}  # screening let the poisoned update through
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((4,), expected))


def _finished_round(work: Path, toml: Path, fahr_version: str = fahr_version()) -> None:
    cfg = load_server_config(toml)
    save_weights(ServerWorkdir(work).checkpoint(1), {"w": torch.zeros(2)})
    ckpt = "checkpoints/global_round_001.safetensors"
    digest = file_sha256(work / ckpt)
    write_state(work, FederationState(1, cfg.rounds, ckpt, digest, fahr_version, model_record(cfg)))


def test_the_state_key_is_private_and_outside_the_workdir(tmp_path):
    toml = server_toml(tmp_path, free_port(), 2, 1)
    _finished_round(tmp_path / "server", toml)
    key = state_key_path()
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert not key.is_relative_to(tmp_path)
    assert read_state(tmp_path / "server").last_round == 1


@pytest.mark.parametrize(
    ("change", "resume", "message"),
    [
        ("", False, "holds an earlier federation's results (state.json, checkpoints)"),
        ("", True, None),
        ('arch = "vit_tiny"', True, "the [model] settings changed since the run started (arch)"),
        ("rounds", True, "the run planned 2 rounds and the config now says 3"),
        ("tamper", True, "differs from the checkpoint recorded"),
        ("rehash", True, "state.json fails its authentication (it was edited"),
        ("nokey", True, "state.key, the key that authenticates state.json, is missing"),
        ("fresh", True, "nothing to resume"),
        ("version", True, "the run was started by fahr 0.0.1 and this is fahr"),
    ],
)
def test_resume_and_fresh_runs_refuse_what_they_cannot_continue(tmp_path, change, resume, message):
    toml = server_toml(tmp_path, free_port(), 2, 1)
    work = tmp_path / "server"
    if change != "fresh":
        _finished_round(work, toml, "0.0.1" if change == "version" else fahr_version())
    if change in ("tamper", "rehash"):
        save_weights(ServerWorkdir(work).checkpoint(1), {"w": torch.ones(2)})
    if change == "rehash":  # and make state.json vouch for the swapped checkpoint
        state = json.loads(ServerWorkdir(work).state.read_text())
        state["checkpoint_sha256"] = file_sha256(ServerWorkdir(work).checkpoint(1))
        atomic_write_text(ServerWorkdir(work).state, json.dumps(state))
    if change == "nokey":
        state_key_path().unlink()
    text = toml.read_text()
    text = text.replace("rounds = 2", "rounds = 3") if change == "rounds" else text
    atomic_write_text(toml, text.replace('arch = "vit_micro"', change) if "arch" in change else text)
    lines: list[str] = []
    started: list[bool] = []

    def stop_once_started() -> None:  # resumable: it got as far as starting the SuperLink
        started.append(True)
        raise KeyboardInterrupt

    code = run_federation(load_server_config(toml), toml, True, lines.append, stop_once_started, resume)
    if message is None:
        assert code == 130 and started and "resuming: rounds 1 to 1 of 2 completed" in "\n".join(lines)
    else:
        assert code == 2 and not started and message in "\n".join(lines), lines
    assert flower_processes_under(tmp_path) == []


def uninterrupted(server: Path, sites: list[Path]) -> dict[str, torch.Tensor]:
    """The federation's global model computed in this process, round after round without a break:
    the same site training (SiteRuntime) and Flower's weighted averaging as the ServerApp's."""
    cfg = load_server_config(server)
    global_model, weights = global_start(cfg)
    for server_round in range(1, cfg.rounds + 1):
        replies = []
        sent = global_model.outgoing(weights, with_base=server_round == 1)
        for toml in sites:
            site = SiteRuntime(load_site_config(toml))
            state, metrics = site.train_round(sent, global_model.spec, server_round, cfg.rounds)
            replies.append(
                RecordDict(
                    {"arrays": ArrayRecord(state), "metrics": MetricRecord({"n": metrics["num-examples"]})}
                )
            )
        weights = aggregate_arrayrecords(replies, "n").to_torch_state_dict()
    return global_model.plain(weights)


@pytest.mark.e2e
def test_server_crash_after_round_1_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_RNG_ENV, "5")  # reproducible site training (tests only), here and in the sites
    sizes = (40, 30)
    port = free_port()
    crash = tmp_path / "crashsrv"
    toml = server_toml(crash, port, 2, 2)
    # the reference: copies of the same sites (own ledgers), trained without interruption
    plain_sites = make_sites(tmp_path / "plainsites", demo_faces_dir(), sizes, epsilon=4.0)
    expected = uninterrupted(toml, plain_sites)

    # The same federation again; the server crashes once round 1 is committed. The sites refuse
    # round 2 until the server is back, so the crash cannot race a site already training round 2.
    resume_go = tmp_path / "server-is-back"
    inject_faults(tmp_path, monkeypatch, {s: {"2": f"fail-unless:{resume_go}"} for s in ("site1", "site2")})
    sites = make_sites(tmp_path / "crashsites", demo_faces_dir(), sizes, epsilon=4.0)
    work = crash / "server"
    server_side = f"--runtime-api-address 127.0.0.1:{port}"
    server = Managed(
        "fahr-server",
        [console_script("fahr-server"), "run", "--config", str(toml), "--insecure"],
        crash / "cli.log",
    )
    clients = [start_site(t, f"127.0.0.1:{port}", free_local_port(), True) for t in sites]
    try:
        wait_for(lambda: (s := read_state(work)) is not None and s.last_round == 1, 600, "round 1", server)
        # the CLI, SuperLink and `flwr run` name the folder; Flower's SuperExec and ServerApp (in a
        # session of their own) name the SuperLink's address
        groups = crash_processes_under(crash, server_side)
        server.proc.wait(timeout=10)
        wait_for(lambda: not live_groups(groups), 10, "the killed server's processes to end")
        assert flower_processes_under(crash) == [] and flower_processes_under(server_side) == []

        resume_go.touch()
        lines = []
        code = run_federation(load_server_config(toml), toml, insecure=True, echo=lines.append, resume=True)
        assert code == 0, "\n".join(lines[-40:])
    finally:
        server.stop()
        for c in clients:
            c.stop()
    assert "resuming: rounds 1 to 1 of 2 completed" in "\n".join(lines)

    final = load_weights(ServerWorkdir(work).global_model)
    worst = max(float((final[k] - expected[k]).abs().max()) for k in final if final[k].is_floating_point())
    assert worst < 1e-4, worst
    assert any(
        not torch.equal(final[k], load_weights(ServerWorkdir(work).checkpoint(1))[k])
        for k in final
        if final[k].is_floating_point()
    )
    assert [r["round"] for r in rounds_log(work)] == [1, 2]
    assert json.loads(ServerWorkdir(work).run_summary.read_text())["completed_rounds"] == [1, 2]

    state = read_state(work)
    for toml_b, toml_a in zip(sites, plain_sites, strict=True):
        ledger, plain_ledger = ledger_of(toml_b), ledger_of(toml_a)
        assert [r["server_round"] for r in ledger.rounds] == [1, 2]  # each round counted once
        assert ledger.epsilon == pytest.approx(plain_ledger.epsilon, rel=1e-6)
        assert state.site_epsilon[load_site_config(toml_b).name] == pytest.approx(ledger.epsilon)
    assert state.last_round == 2
    assert flower_processes_under(tmp_path) == []
    wait_for(lambda: not flower_processes_under(server_side), 30, "the SuperExec to follow the SuperLink")


def clientapps_of(groups: set[int]) -> list[str]:
    return [cmd for cmd in live_groups(groups) if "flwr-clientapp" in cmd]


@pytest.mark.e2e
def test_sites_dying_rejoining_and_sending_bad_updates(tmp_path, monkeypatch):
    """Three sites, at least two needed. Round 1: site2 sends an oversized update. Round 2: site3
    dies mid-round and restarts with the same key (site1 holds its round-2 training until then, so
    the round stays open). Round 3: site1 sends NaN weights; the restarted site3 takes part."""
    port = free_port()
    security, connections = local_credentials(tmp_path / "certs", ["site1", "site2", "site3"], port)
    sites = make_sites(tmp_path / "sites", demo_faces_dir(), (30, 30, 30), connections=connections)
    restarted = tmp_path / "site3-restarted"
    inject_faults(
        tmp_path,
        monkeypatch,
        {"site1": {"2": f"wait-for:{restarted}", "3": "nan"}, "site2": {"1": "scale"}},
    )
    toml = server_toml(tmp_path, port, 3, 2, security)
    work = tmp_path / "server"
    node = tmp_path / "sites" / "site3"
    site3: list[Managed] = []
    problems: list[BaseException] = []

    def kill_and_restart_site3() -> None:
        try:
            wait_for(lambda: (s := read_state(work)) is not None and s.last_round == 1, 900, "round 1")
            wait_for(lambda: bool(clientapps_of(process_groups_under(node))), 300, "site3's round 2")
            groups = crash_processes_under(node)
            wait_for(lambda: not live_groups(groups), 10, "the killed site's processes to end")
            problems.extend(AssertionError(cmd) for cmd in flower_processes_under(node))
            # Flower counts a node as gone once it missed its heartbeats; restart only after that
            time.sleep((HEARTBEAT_PATIENCE + 0.5) * HEARTBEAT_DEFAULT_INTERVAL)
            site3.append(start_site(sites[2], f"127.0.0.1:{port}", free_port()))
            log = site3[0].log_path  # the same file as the first start's: count the joins
            wait_for(lambda: log.read_text().count("SuperNode joining") == 2, 300, "site3 to restart")
        except BaseException as e:  # reported by the test, after the federation
            problems.append(e)
        finally:
            restarted.touch()

    lines: list[str] = []
    watcher = threading.Thread(target=kill_and_restart_site3, daemon=True)
    watcher.start()
    try:
        code = run_local_federation(toml, sites, lines.append)
    finally:
        for c in site3:
            c.stop()
    watcher.join(timeout=5)
    assert not problems, problems
    assert code == 0, "\n".join(lines[-40:])

    r1, r2, r3 = rounds_log(work)
    assert set(r1["rejected"]) == {"site2"} and "median of the other sites" in r1["rejected"]["site2"]
    assert set(r1["sites"]) == {"site1", "site3"}
    assert set(r2["sites"]) == {"site1", "site2"} and not r2["rejected"]
    assert set(r2["failures"]) == {"site3"}, r2["failures"]  # Flower's node-unavailable error
    assert set(r3["rejected"]) == {"site1"} and "non-finite" in r3["rejected"]["site1"]
    assert set(r3["sites"]) == {"site2", "site3"}  # the restarted site rejoined
    logged = [json.loads(line) for line in ServerWorkdir(work).rejections_log.read_text().splitlines()]
    assert [(r["round"], r["site"]) for r in logged] == [(1, "site2"), (3, "site1")]
    assert read_state(work).rejections == {"site1": 1, "site2": 1}
    assert flower_processes_under(tmp_path) == []


def test_resume_drops_uncommitted_and_half_written_log_lines(tmp_path):
    ServerWorkdir(tmp_path).rounds_log.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "si')
    ServerWorkdir(tmp_path).rejections_log.write_text(
        '{"round": 1, "site": "a"}\n{"round": 2, "site": "a"}\n'
    )
    trim_rounds_log(tmp_path, 1)
    assert rounds_log(tmp_path) == [{"round": 1}]
    assert ServerWorkdir(tmp_path).rejections_log.read_text() == '{"round": 1, "site": "a"}\n'
