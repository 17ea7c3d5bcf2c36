"""Site summaries survive the trip to the server as flat metrics (tests/test_outbound.py pins which)."""

from __future__ import annotations

from fahr_core.protocol.outbound import check_outbound
from fahr_core.protocol.wire import metrics_to_summary, summary_to_metrics


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
