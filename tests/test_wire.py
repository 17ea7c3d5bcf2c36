"""Site summaries survive the trip to the server as flat metrics (tests/test_outbound.py pins which)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from fahr_core.models.saliency import CohortSaliency
from fahr_core.protocol.outbound import ALLOW_LIST, check_outbound
from fahr_core.protocol.wire import (
    FIELDS,
    KEYS,
    metrics_to_summary,
    privacy_metrics,
    summary_to_metrics,
    wire_fields,
)
from fahr_core.report.site import site_summary
from fahr_core.report.summary import PatientScores, SiteContext, SiteSummary
from fahr_core.survival.results import wire
from tests.support import simulate


def test_summary_round_trips_through_metrics():
    summary = {
        "site": "a",
        "n": 40,
        "events": 9,
        "c_index": 0.71,
        "c_index_ci": [0.6, 0.8],
        "uno_c": 0.69,
        "uno_c_ci": [0.55, 0.81],
        "logrank_p": 0.03,
        "hr_top_vs_bottom": {"hr": 3.1, "ci_low": 1.2, "ci_high": 8.0, "p": 0.02},
        "hr_per_sd_adjusted": {"hr": 1.6, "ci_low": 1.1, "ci_high": 2.3, "sd": 0.4},
        "privacy": {"epsilon": 7.5, "delta": 1e-3},
        "notes": ["anything"],
    }
    metrics = summary_to_metrics(summary)
    check_outbound({}, {}, metrics)
    back = metrics_to_summary("a", metrics)
    for key in ("n", "events", "c_index", "c_index_ci", "uno_c", "uno_c_ci", "logrank_p"):
        assert back[key] == summary[key]
    assert back["hr_top_vs_bottom"] == {"hr": 3.1, "ci_low": 1.2, "ci_high": 8.0}
    assert back["hr_per_sd_adjusted"] == {"hr": 1.6, "ci_low": 1.1, "ci_high": 2.3}
    assert back["privacy"] == {"epsilon": 7.5}


def test_missing_statistics_stay_missing():
    back = metrics_to_summary("b", summary_to_metrics({"n": 4, "events": 0, "c_index": None}))
    assert back["c_index"] is None and back["c_index_ci"] is None and back["hr_per_sd_adjusted"] is None
    assert back["n"] == 4
    nothing = metrics_to_summary("c", {})  # a suppressed evaluation: no counts at all
    assert nothing["n"] == 0 and nothing["events"] == 0


# The scalars a site sends only with a training reply (or secure aggregation's mask stage), never
# with an evaluation; tests/test_outbound.py pins the whole allow-list.
TRAINING_ONLY = {"delta", "epsilon-budget", "noise-multiplier", "sample-rate", "steps", "bytes-sent"}


def test_every_wire_key_is_allowed_and_every_allowed_evaluation_key_is_sent():
    assert set(ALLOW_LIST) >= KEYS, sorted(KEYS - set(ALLOW_LIST))
    assert set(ALLOW_LIST) - TRAINING_ONLY - {"secagg-clipped"} == KEYS


def _fad_summary() -> SiteSummary:
    """A real site summary with every wired section: FAD (which carries hazard here) and saliency."""
    d = simulate(n=300, seed=5)
    rng = np.random.default_rng(3)
    fad = rng.normal(0, 6, 300) + 3 * d["risk"]
    maps = {"survival": rng.random((8, 8)), "age": rng.random((8, 8))}
    saliency = CohortSaliency(maps, np.zeros((3, 8, 8), np.uint8), 300)
    scores = PatientScores(d["time"], d["event"], d["risk"], d["age"], d["male"], fad=fad)
    context = SiteContext("a", {"epsilon": 3.0}, {}, horizon=5.0, age_model={"sha256": "ab" * 32})
    return site_summary(scores, context, saliency, n_boot=20)


def test_a_computed_summary_sends_every_evaluation_key_and_the_server_rebuilds_it():
    summary = _fad_summary()
    metrics = summary_to_metrics(summary)
    assert set(metrics) == KEYS  # every statistic could be computed here, so every key goes
    assert isinstance(metrics["num-examples"], int)  # the count Flower's FedAvg weighs replies by
    check_outbound({}, {}, metrics)
    doc = json.loads(json.dumps(summary.to_json()))  # as summary.json holds it
    assert summary_to_metrics(doc) == metrics
    back = metrics_to_summary("a", metrics)
    assert back["n"] == 300 and back["events"] == summary.evaluation.events  # counts, as ints
    assert isinstance(back["n"], int) and isinstance(back["events"], int)
    for f in FIELDS:  # each sent value lands where it came from
        sent, rebuilt = doc, back
        for key in f.path:
            sent, rebuilt = sent[key], rebuilt[key]
        if f.kind == "result":
            sent = {part: sent[part] for part in f.parts}
        assert rebuilt == pytest.approx(sent), f.key
    assert back["fad"]["joint"]["lr_test"]["risk"] == {"p": summary.fad.joint.lr_test.risk.p}
    assert back["privacy"] == {"epsilon": 3.0}


def test_an_evaluation_without_statistics_sends_its_privacy_account_only():
    assert privacy_metrics({"epsilon": 1.5, "delta": 1e-5}) == {"epsilon": 1.5, "num-examples": 0}


@dataclass(frozen=True)
class _Listed:
    names: tuple[str, ...] = field(metadata=wire("names"))
    notes: list[str] = field(metadata=wire("notes"))


def test_a_field_that_is_not_numbers_cannot_be_marked_for_the_wire():
    with pytest.raises(TypeError, match=r"_Listed.notes: a list\[str\] cannot be sent"):
        wire_fields(_Listed)
