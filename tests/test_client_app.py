"""The real ClientApp's gates: what leaves a site in train and evaluate replies, and when nothing does.

Messages are handed to `fahr_client.app.app` in this process, as the SuperNode would hand them to a
ClientApp process: the outbound gate, the audit log and the evaluation limit are the real ones.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fahr_client.app import SiteDeclined, _reply
from fahr_client.app import app as client_app
from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import demo_faces_dir
from fahr_core.config import ModelConfig, load_site_config
from fahr_core.faces.images import to_input
from fahr_core.models.finetune import base_sha256, build, split_state
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy.audit import EVALUATION_ADMITTED, verify_audit_log
from fahr_core.protocol.outbound import OutboundViolation
from fahr_core.protocol.spec import spec_to_record
from fahr_core.release import fahr_version
from fahr_core.survival.losses import discrete_hazard_nll
from tests.support import make_sites

SPEC = ModelConfig(arch="vit_micro", img_size=112, n_intervals=10, horizon_years=10.0)
_FROZEN = set(split_state(build(SPEC))[1])  # what full fine-tuning leaves frozen (class token, positions)
RUN = 7


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for key, value in (("_run_id", RUN), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _ask(kind: str, weights: dict, server_round: int = 1, num_rounds: int = 1) -> Message:
    frozen = {k: v for k, v in weights.items() if k in _FROZEN}  # the base the spec names by its hash
    config = {
        **spec_to_record(replace(SPEC, base_sha256=base_sha256(frozen))),
        "server-round": server_round,
        "num-rounds": num_rounds,
        "fahr-version": fahr_version(),
    }
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=5, message_type=kind)


def _send(toml: Path, kind: str, weights: dict, run: int = RUN) -> Message:
    return client_app(_ask(kind, weights), Context(run, 5, {"site-config": str(toml)}, RecordDict(), {}))


def _initial() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SurvivalViT(SPEC.arch, SPEC.img_size, SPEC.n_intervals).state_dict()


def test_the_reply_gate_refuses_and_writes_no_audit_line(demo_site):
    site = SiteRuntime(load_site_config(demo_site))
    msg = _ask("train", {})
    ref = {"w": torch.zeros(3)}
    bad = [
        ({"num-examples": 40, "train-loss": 0.31}, None),  # not on the allow-list
        ({"num-examples": 40, "epsilon": float("nan")}, None),
        ({"num-examples": 40, "epsilon": True}, None),
        ({"num-examples": 4}, None),  # the small-cell rule
        ({"num-examples": 40}, {"w": torch.zeros(3), "per_patient": torch.zeros(40)}),
    ]
    for metrics, weights in bad:
        with pytest.raises(OutboundViolation):
            _reply(msg, site, 1, metrics, weights or ref, ref)
        assert not site.cfg.paths.audit.exists()
    _reply(msg, site, 1, {"num-examples": 40}, {"w": torch.ones(3)}, ref)
    assert verify_audit_log(site.cfg.paths.audit) == 1


def _variant(base: Path, name: str, target: str, time: float) -> Path:
    """A copy of the site (faces already aligned and cached) whose `target` patient died at `time`."""
    site = base.parent / name
    shutil.copytree(base, site)
    rows = list(csv.DictReader((site / "cohort.csv").open()))
    for row in rows:
        if row["patient_id"] == target:
            row["time"], row["event"] = f"{time:.4f}", "1"
    with (site / "cohort.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return site / "site.toml"


def _mean_loss(toml: Path, weights: dict) -> float:
    """The un-noised mean training loss the site used to send (computed here, as the attacker wants)."""
    split = SiteRuntime(load_site_config(toml)).load(SPEC.img_size)
    model = SurvivalViT(SPEC.arch, SPEC.img_size, SPEC.n_intervals)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        eta, alpha = model(to_input(split.train.images[[idx[0] for idx in split.train.photos]]))
    time, event = torch.from_numpy(split.train.time), torch.from_numpy(split.train.event).float()
    return float(discrete_hazard_nll(eta, alpha, time, event, SPEC.horizon_years))


def test_crafted_global_weights_learn_nothing_about_a_patient_from_the_metrics(tmp_path):
    """The server's membership oracle: weights whose baseline makes a death in the first year cost
    ~30 nats and one in the last interval ~0. The mean training loss under them tells
    whether the target died early; every metric the site sends is the same either way."""
    base = Path(make_sites(tmp_path / "sites", demo_faces_dir(), (20,))[0]).parent
    split = SiteRuntime(load_site_config(base / "site.toml")).load(SPEC.img_size)  # align and cache once
    target = next(p.patient_id for p in split.train_cohort.patients if p.event == 1)  # stays a death
    early, late = _variant(base, "early", target, 0.5), _variant(base, "late", target, 9.5)
    honest = _initial()
    crafted = {**honest, "head.baseline.weight": torch.tensor([-30.0] * 9 + [3.0]).unsqueeze(1)}
    assert _mean_loss(early, crafted) - _mean_loss(late, crafted) > 20 / len(split.train)  # the oracle

    sent = {}
    for name, toml in (("early", early), ("late", late)):
        for kind, weights in (("honest", honest), ("crafted", crafted)):
            site_copy = _variant(toml.parent, f"{name}-{kind}", target, 0.5 if name == "early" else 9.5)
            reply = _send(site_copy, "train", weights)
            assert not reply.has_error()
            sent[name, kind] = dict(reply.content["metrics"])
    assert set(sent["early", "crafted"]) == {
        "num-examples",
        "epsilon",
        "delta",
        "epsilon-budget",
        "noise-multiplier",
        "sample-rate",
        "steps",
        "bytes-sent",
    }
    assert all(metrics == sent["early", "crafted"] for metrics in sent.values()), sent


def _trained(tmp_path: Path) -> Path:
    """A site of 20 patients (14 train, 6 held out) that trained one round in run RUN."""
    toml = make_sites(tmp_path, demo_faces_dir(), (20,))[0]
    assert not _send(toml, "train", _initial()).has_error()
    return toml


def _suppressed(toml: Path) -> dict:
    """What an evaluation sends when every aggregate is suppressed: the site's DP spend only."""
    cfg = load_site_config(toml)
    rounds = json.loads(cfg.paths.ledger.read_text())["rounds"]
    return {"epsilon": round(rounds[-1]["epsilon_after"], 4)}


def _audit_kinds(toml: Path) -> list[tuple[str, int]]:
    lines = load_site_config(toml).paths.audit.read_text().splitlines()
    return [(r["kind"], r["run_id"]) for r in map(json.loads, lines)]


def test_a_small_test_split_sends_no_outcome_statistics(tmp_path):
    toml = _trained(tmp_path)
    reply = _send(toml, "evaluate", _initial())
    assert not reply.has_error()
    assert dict(reply.content["metrics"]) == _suppressed(toml)  # 6 held-out patients: all suppressed
    record = json.loads(load_site_config(toml).paths.audit.read_text().splitlines()[-1])
    assert (record["kind"], record["run_id"], record["metrics"]) == ("evaluate", RUN, _suppressed(toml))


def test_a_site_answers_as_many_evaluations_per_run_as_its_config_allows(tmp_path):
    toml = _trained(tmp_path)
    cfg = load_site_config(toml)
    assert _send(toml, "evaluate", _initial()).content["metrics"]
    with pytest.raises(SiteDeclined, match="reason is in the site's own log"):  # the server learns no more
        _send(toml, "evaluate", _initial())
    assert verify_audit_log(cfg.paths.audit) == 3  # train, admitted, evaluate: the refusal sent nothing
    toml.write_text(toml.read_text().replace("evaluations_per_run = 1", "evaluations_per_run = 2"))
    assert _send(toml, "evaluate", _initial()).content["metrics"]
    with pytest.raises(SiteDeclined):
        _send(toml, "evaluate", _initial())
    assert _audit_kinds(toml) == [("train", RUN)] + [(EVALUATION_ADMITTED, RUN), ("evaluate", RUN)] * 2


def test_a_site_evaluates_only_in_runs_it_trained_in(tmp_path, monkeypatch):
    """A server that starts a new run for every question gets no answer: the site never trained there."""
    untrained = make_sites(tmp_path / "untrained", demo_faces_dir(), (20,))[0]
    with pytest.raises(SiteDeclined):
        _send(untrained, "evaluate", _initial())
    assert not load_site_config(untrained).paths.audit.exists()
    toml = _trained(tmp_path / "trained")
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN + 1)
    with pytest.raises(SiteDeclined):
        _send(toml, "evaluate", _initial(), run=RUN + 1)
    assert _audit_kinds(toml) == [("train", RUN)]


def test_a_failed_evaluation_is_counted_and_answers_as_a_suppressed_one(tmp_path):
    """Weights that make a held-out face's risk non-finite: the site still answers, exactly as it does
    when its statistics are suppressed, so failing is no membership oracle, and the attempt counts."""
    toml = _trained(tmp_path)
    crafted = _initial()
    crafted["head.risk.weight"] = torch.full_like(crafted["head.risk.weight"], 3e38)
    crafted["head.risk.bias"] = torch.full_like(crafted["head.risk.bias"], 3e38)
    reply = _send(toml, "evaluate", crafted)
    assert not reply.has_error()
    assert dict(reply.content["metrics"]) == _suppressed(toml)
    with pytest.raises(SiteDeclined):  # the failed evaluation used the run's one evaluation
        _send(toml, "evaluate", _initial())
    assert _audit_kinds(toml) == [("train", RUN), (EVALUATION_ADMITTED, RUN), ("evaluate", RUN)]
