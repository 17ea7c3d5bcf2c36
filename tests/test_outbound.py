"""The allow-list of what a site may send, pinned here as a literal, and the gate that enforces it.

The literal below is the reviewed list: adding a metric, or moving one to another release class,
fails this test until the list here is changed too (and docs/privacy.md with it).
"""

from __future__ import annotations

import math

import pytest

from fahr_core.protocol.outbound import (
    ALLOW_LIST,
    MIN_EVENTS,
    MIN_PATIENTS,
    OutboundViolation,
    Release,
    check_outbound,
    suppress_small_cells,
)
from fahr_core.protocol.wire import summary_to_metrics

PINNED = {
    "num-examples": "aggregate",
    "epsilon": "public",
    "delta": "public",
    "epsilon-budget": "public",
    "noise-multiplier": "public",
    "sample-rate": "public",
    "steps": "public",
    "bytes-sent": "public",
    "secagg-clipped": "dp",
    "events": "aggregate",
    "c-index": "aggregate",
    "c-index-low": "aggregate",
    "c-index-high": "aggregate",
    "uno-c": "aggregate",
    "uno-c-low": "aggregate",
    "uno-c-high": "aggregate",
    "logrank-p": "aggregate",
    "hr-top-bottom": "aggregate",
    "hr-top-bottom-low": "aggregate",
    "hr-top-bottom-high": "aggregate",
    "hr-sd-adj": "aggregate",
    "hr-sd-adj-low": "aggregate",
    "hr-sd-adj-high": "aggregate",
    "fad-mean": "aggregate",
    "fad-mean-abs": "aggregate",
    "fad-risk-r": "aggregate",
    "fad-risk-r-low": "aggregate",
    "fad-risk-r-high": "aggregate",
    "fad-hr-decade": "aggregate",
    "fad-hr-decade-low": "aggregate",
    "fad-hr-decade-high": "aggregate",
    "fad-lr-p": "aggregate",
    "risk-lr-p": "aggregate",
    "saliency-similarity": "aggregate",
}
CLASS = {Release.DP: "dp", Release.PUBLIC: "public", Release.AGGREGATE: "aggregate"}


def test_the_allow_list_is_exactly_the_reviewed_literal():
    assert {name: CLASS[release] for name, (release, _) in ALLOW_LIST.items()} == PINNED
    assert all(why for _, why in ALLOW_LIST.values())
    assert (MIN_PATIENTS, MIN_EVENTS) == (10, 5)


def test_the_loss_and_timings_are_refused():
    for key in ("train-loss", "train-seconds", "handler-seconds", "startup-seconds"):
        with pytest.raises(OutboundViolation, match="not on the list"):
            check_outbound({}, {}, {key: 1.0})


@pytest.mark.parametrize("value", [True, "0.7", float("nan"), float("inf"), -math.inf, None, [0.7]])
def test_only_finite_numbers_pass(value):
    check_outbound({}, {}, {"epsilon": 0.7})
    with pytest.raises(OutboundViolation, match="must be a finite number"):
        check_outbound({}, {}, {"epsilon": value})


def _evaluation(n: int, events: int) -> dict:
    return {
        "num-examples": n,
        "events": events,
        "c-index": 1.0,
        "c-index-low": 1.0,
        "c-index-high": 1.0,
        "epsilon": 2.0,
    }


@pytest.mark.parametrize(("n", "events"), [(2, 1), (9, 5), (40, 4), (40, 0)])
def test_small_evaluations_are_suppressed_and_refused_unsuppressed(n, events):
    metrics = _evaluation(n, events)
    with pytest.raises(OutboundViolation, match="small-cell rule"):
        check_outbound({}, {}, metrics)
    kept = suppress_small_cells(metrics)
    assert kept == {"epsilon": 2.0}  # what is left is the ledger's epsilon only
    check_outbound({}, {}, kept)


def test_aggregates_over_enough_patients_and_events_pass():
    metrics = _evaluation(10, 5)
    assert suppress_small_cells(metrics) == metrics
    check_outbound({}, {}, metrics)
    with pytest.raises(OutboundViolation, match="rest on None event"):  # a statistic without its events
        check_outbound({}, {}, {"num-examples": 40, "c-index": 0.7})


def test_a_training_reply_needs_ten_training_patients():
    reply = {"num-examples": 10, "epsilon": 1.0, "steps": 3}
    check_outbound({}, {}, reply)
    with pytest.raises(OutboundViolation, match="describe 9 patient"):
        check_outbound({}, {}, {**reply, "num-examples": 9})


def test_every_metric_a_full_site_summary_yields_is_on_the_list():
    summary = {
        "n": 40,
        "events": 9,
        "c_index": 0.71,
        "c_index_ci": [0.6, 0.8],
        "uno_c": 0.69,
        "uno_c_ci": [0.55, 0.81],
        "logrank_p": 0.03,
        "hr_top_vs_bottom": {"hr": 3.1, "ci_low": 1.2, "ci_high": 8.0},
        "hr_per_sd_adjusted": {"hr": 1.6, "ci_low": 1.1, "ci_high": 2.3},
        "fad": {
            "mean": 1.0,
            "mean_abs": 3.0,
            "correlation": {"pearson": 0.2, "pearson_ci": [0.1, 0.3]},
            "hr_per_decade": {"hr": 1.2, "ci_low": 1.0, "ci_high": 1.4},
            "joint": {"lr_test": {"fad": {"p": 0.2}, "risk": {"p": 0.01}}},
        },
        "saliency": {"similarity": 0.5},
        "privacy": {"epsilon": 7.5},
    }
    metrics = summary_to_metrics(summary)
    assert set(metrics) == set(PINNED) - {
        "delta",
        "epsilon-budget",
        "noise-multiplier",
        "sample-rate",
        "steps",
        "bytes-sent",
        "secagg-clipped",
    }
    check_outbound({}, {}, metrics)
