"""Survival statistics on synthetic cohorts where the right answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lifelines.utils import concordance_index

from fahr_core.survival import metrics as m


def cohort(n: int, beta: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential event times with hazard exp(beta * risk), independent exponential censoring."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-beta * risk))
    t_censor = rng.exponential(2.0, size=n)
    return np.minimum(t_event, t_censor), (t_event <= t_censor).astype(int), risk


def brute_force_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C by enumerating pairs; a censored time tied with a death counts as surviving longer."""
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_harrell_c_sign_on_hand_example() -> None:
    t, e = np.array([1.0, 2.0, 3.0]), np.array([1, 1, 1])
    assert m.harrell_c(t, e, np.array([3.0, 2.0, 1.0])) == 1.0  # earliest death had highest risk
    assert m.harrell_c(t, e, np.array([1.0, 2.0, 3.0])) == 0.0


def test_harrell_c_matches_lifelines_and_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    t = np.round(rng.exponential(2.0, size=120), 1)  # tied times
    e = rng.integers(0, 2, size=120)
    r = np.round(rng.normal(size=120), 1)  # tied risks
    assert len(np.unique(t)) < len(t) and len(np.unique(r)) < len(r)
    c = m.harrell_c(t, e, r)
    assert c == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
    assert c == pytest.approx(brute_force_c(t, e, r), abs=1e-12)


def test_harrell_c_is_nan_without_comparable_pairs() -> None:
    assert math.isnan(m.harrell_c(np.ones(5), np.zeros(5, int), np.arange(5.0)))
    assert math.isnan(m.harrell_c(np.ones(5), np.ones(5, int), np.arange(5.0)))  # all deaths tied


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n() -> None:
    widths = []
    for n in (80, 800):
        t, e, r = cohort(n, seed=n)
        c = m.harrell_c(t, e, r)
        lo, hi = m.bootstrap_ci(t, e, r, n_boot=50, seed=0)
        assert lo <= c <= hi
        assert lo > 0.5  # real signal is detected
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_ci_is_nan_when_no_resample_is_usable() -> None:
    lo, hi = m.bootstrap_ci(np.arange(1.0, 6.0), np.zeros(5, int), np.arange(5.0), n_boot=20)
    assert math.isnan(lo) and math.isnan(hi)


def test_risk_quartiles_balanced_even_with_all_risks_tied() -> None:
    q = m.risk_quartiles(np.zeros(40))
    assert np.bincount(q).tolist() == [10, 10, 10, 10]
    q = m.risk_quartiles(np.arange(8.0))
    assert q.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        m.risk_quartiles(np.arange(3.0))


def test_quartile_hazard_ratio_detects_strong_risk_effect() -> None:
    t, e, r = cohort(400, beta=1.0, seed=3)
    hr = m.quartile_hazard_ratio(t, e, r)
    assert hr["n"] == 200
    assert hr["hr"] > 3 and hr["ci_low"] > 1 and hr["p"] < 1e-3


def test_quartile_hazard_ratio_near_one_without_effect() -> None:
    t, e, r = cohort(400, beta=0.0, seed=4)
    hr = m.quartile_hazard_ratio(t, e, r)
    assert hr["ci_low"] < 1 < hr["ci_high"]


def test_km_and_logrank_by_quartile() -> None:
    t, e, r = cohort(300, seed=5)
    q = m.risk_quartiles(r)
    curves = m.km_by_quartile(t, e, q)
    assert [c.quartile for c in curves] == [0, 1, 2, 3]
    assert sum(c.n for c in curves) == 300
    for c in curves:
        assert np.all(np.diff(c.survival) <= 0) and c.survival[0] == 1.0
    # survival at the end of follow-up is lower for the highest-risk quartile
    assert curves[3].survival[-1] < curves[0].survival[-1]
    assert m.logrank_quartiles(t, e, q) < 1e-3


def test_evaluate_full_cohort_is_json_and_complete() -> None:
    t, e, r = cohort(300, seed=6)
    out = m.evaluate(t, e, r, n_boot=50)
    json.dumps(out, allow_nan=False)
    assert out["n"] == 300 and out["events"] == int(e.sum())
    assert out["c_index"] > 0.6 and out["c_index_ci"][0] <= out["c_index"] <= out["c_index_ci"][1]
    assert out["hr_top_vs_bottom"]["hr"] > 1 and out["logrank_p"] < 0.05
    assert out["median_follow_up"] > 0
    assert out["notes"] == []


DEGENERATE = {
    "no_events": (np.linspace(0.1, 3, 30), np.zeros(30, int), np.linspace(-1, 1, 30)),
    "one_event": (np.linspace(0.1, 3, 30), np.r_[1, np.zeros(29, int)], np.linspace(-1, 1, 30)),
    "n5": (np.array([0.5, 1.0, 1.5, 2.0, 2.5]), np.array([1, 0, 1, 0, 1]), np.arange(5.0)),
    "all_tied_times": (np.ones(20), np.ones(20, int), np.linspace(-1, 1, 20)),
    "time_zero": (np.r_[np.zeros(5), np.linspace(0.1, 3, 25)], np.r_[[1, 0] * 15], np.linspace(-1, 1, 30)),
    "empty": (np.array([]), np.array([], int), np.array([])),
    "single": (np.array([1.0]), np.array([1]), np.array([0.0])),
}


@pytest.mark.parametrize("name", DEGENERATE)
def test_evaluate_degenerate_cohorts_give_notes_not_exceptions(name: str) -> None:
    out = m.evaluate(*DEGENERATE[name], n_boot=50)
    json.dumps(out, allow_nan=False)
    assert out["notes"], "a degenerate cohort must explain itself"
    hr = out["hr_top_vs_bottom"]
    if name == "all_tied_times":  # no timing information: any HR must show no effect
        assert out["c_index"] is None and (hr is None or hr["p"] > 0.5)
    elif name != "time_zero":
        assert hr is None


def test_evaluate_reports_nonconvergent_cox_as_note() -> None:
    t, _, r = cohort(40, seed=7)
    e = (r > np.quantile(r, 0.8)).astype(int)  # every death in the top risk quartile: complete separation
    out = m.evaluate(t, e, r, n_boot=20)
    assert out["hr_top_vs_bottom"] is None
    assert any("did not converge" in n for n in out["notes"])


@pytest.mark.parametrize(
    "args",
    [
        ([1.0, -1.0], [1, 0], [0.0, 1.0]),
        ([1.0, 2.0], [1, 2], [0.0, 1.0]),
        ([1.0], [1, 0], [0.0]),
        ([1.0], [1], [np.nan]),
    ],
)
def test_invalid_inputs_raise(args: tuple) -> None:
    with pytest.raises(ValueError):
        m.evaluate(*args)
