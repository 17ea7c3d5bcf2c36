"""Survival statistics on synthetic cohorts where the right answer is known."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
from lifelines.utils import concordance_index

from fahr_core.survival import metrics as m
from tests.support import DEGENERATE, cohort, simulate, true_surv


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
    assert hr.n == 200
    assert hr.hr > 3 and hr.ci_low > 1 and hr.p < 1e-3


def test_quartile_hazard_ratio_near_one_without_effect() -> None:
    t, e, r = cohort(400, beta=0.0, seed=4)
    hr = m.quartile_hazard_ratio(t, e, r)
    assert hr.ci_low < 1 < hr.ci_high


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
    json.dumps(out.to_json(), allow_nan=False)
    assert out.n == 300 and out.events == int(e.sum())
    assert out.c_index > 0.6 and out.c_index_ci[0] <= out.c_index <= out.c_index_ci[1]
    assert out.hr_top_vs_bottom.hr > 1 and out.logrank_p < 0.05
    assert out.median_follow_up > 0
    assert out.notes == ()


@pytest.mark.parametrize("name", DEGENERATE)
def test_evaluate_degenerate_cohorts_give_notes_not_exceptions(name: str) -> None:
    out = m.evaluate(*DEGENERATE[name], n_boot=50)
    json.dumps(out.to_json(), allow_nan=False)
    assert out.notes, "a degenerate cohort must explain itself"
    hr = out.hr_top_vs_bottom
    if name == "all_tied_times":  # no timing information: any HR must show no effect
        assert out.c_index is None and (hr is None or hr.p > 0.5)
    elif name != "time_zero":
        assert hr is None


def test_evaluate_reports_nonconvergent_cox_as_note() -> None:
    t, _, r = cohort(40, seed=7)
    e = (r > np.quantile(r, 0.8)).astype(int)  # every death in the top risk quartile: complete separation
    out = m.evaluate(t, e, r, n_boot=20)
    assert out.hr_top_vs_bottom is None
    assert any("did not converge" in n for n in out.notes)


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


# --- Uno's C, time-dependent AUC, adjusted hazard ratios, calibration -------------------------------------


def censoring_km(time: np.ndarray, event: np.ndarray) -> Callable[[float, bool], float]:
    """Brute-force Kaplan-Meier of the censoring distribution: G(t) (or G(t-) with left=True).

    A death is not a censoring; at a censoring time s, everyone with time >= s who did not die at s is at
    risk of being censored. Written from the definition, independent of lifelines and scikit-survival.
    """

    def g(t: float, left: bool = False) -> float:
        out = 1.0
        for s in np.unique(time[event == 0]):
            if s < t or (s == t and not left):
                at_risk = np.sum(time >= s) - np.sum((time == s) & (event == 1))
                out *= 1.0 - np.sum((time == s) & (event == 0)) / at_risk
        return out

    return g


def brute_force_uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tau: float) -> float:
    """Uno et al. (2011): sum over pairs (i died before tau, T_j > T_i) of G(T_i)^-2 [risk_i > risk_j]."""
    g = censoring_km(time, event)
    num = den = 0.0
    for i in range(len(time)):
        if not event[i] or time[i] >= tau:
            continue
        w = g(time[i]) ** -2
        for j in range(len(time)):
            if time[j] > time[i]:
                den += w
                num += w * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
    return num / den


def brute_force_td_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, t: float) -> float:
    """Cumulative/dynamic AUC(t) (Uno 2007; Hung and Chiang 2010): cases died by t, weighted 1 / G(T_i);
    controls still followed beyond t; a pair scores 1 if the case has the higher risk, 1/2 if tied."""
    g = censoring_km(time, event)
    cases = [i for i in range(len(time)) if event[i] and time[i] <= t]
    controls = [j for j in range(len(time)) if time[j] > t]
    num = den = 0.0
    for i in cases:
        w = 1.0 / g(time[i])
        for j in controls:
            den += w
            num += w * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
    return num / den


def small_cohort(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 patients, continuous times (no ties), risk rounded to 1 decimal (tied risks exercise the 1/2)."""
    t, e, r = cohort(60, seed=seed)
    return t, e, np.round(r, 1)


@pytest.mark.parametrize("tau", [1.0, 1.5, None])
def test_uno_c_matches_brute_force_and_sksurv_at_the_same_tau(tau: float | None) -> None:
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    t, e, r = small_cohort(seed=8)
    assert len(np.unique(r)) < len(r) and len(np.unique(t)) == len(t)
    got = m.uno_c(t, e, r, tau=tau)
    assert got == pytest.approx(brute_force_uno_c(t, e, r, np.inf if tau is None else tau), abs=1e-12)
    y = Surv.from_arrays(e.astype(bool), t)
    assert got == pytest.approx(concordance_index_ipcw(y, y, r, tau=tau)[0], abs=1e-12)


def test_uno_tau_is_the_horizon_unless_follow_up_is_too_short() -> None:
    """Item 8: one tau for every site (the model horizon); capped at a whole year only where G(tau-) < 0.1."""
    rng = np.random.default_rng(3)
    n = 400
    t_death = rng.exponential(20.0, n)
    for censor_max, expected in ((30.0, 10.0), (12.0, 10.0), (7.5, None)):
        t_censor = np.minimum(rng.uniform(0.0, censor_max, n), 10.0)  # administrative censoring at 10
        t = np.minimum(t_death, t_censor)
        e = (t_death <= t_censor).astype(int)
        g = censoring_km(t, e)
        tau = m.uno_tau(t, e, horizon=10.0)
        if expected is not None:
            assert tau == expected and g(tau, left=True) >= 0.1
        else:  # the largest whole year with at least 10% still uncensored just before it
            assert tau == max(y for y in range(1, 10) if g(y, left=True) >= 0.1) and tau < 7.5
            assert g(tau + 1, left=True) < 0.1
        out = m.evaluate(t, e, -t_death, n_boot=0, horizon=10.0)  # risk: any score will do
        assert out.uno_c_tau == tau and out.uno_c_horizon == 10.0
        assert out.uno_c == pytest.approx(brute_force_uno_c(t, e, -t_death, tau), abs=1e-12)
    with pytest.raises(m.NotEstimable, match="under follow-up"):
        m.uno_tau(np.linspace(0.01, 0.9, 30), np.zeros(30, int), horizon=10.0)


def test_uno_c_not_estimable_without_deaths_and_bootstrap_handles_any_stat() -> None:
    with pytest.raises(m.NotEstimable, match="no deaths"):
        m.uno_c(np.linspace(0.1, 3, 30), np.zeros(30, int), np.linspace(-1, 1, 30))
    t, e, r = cohort(200, seed=9)
    lo, hi = m.bootstrap_ci(t, e, r, stat=partial(m.uno_c, tau=2.0), n_boot=50)
    assert lo <= m.uno_c(t, e, r, tau=2.0) <= hi and lo > 0.5
    # any per-patient statistic over any number of aligned arrays: here the death rate among the old
    age = np.linspace(20, 90, 200)
    lo, hi = m.bootstrap_ci(e, age, stat=lambda ev, a: float(ev[a > 60].mean()), n_boot=50)
    assert lo <= e[age > 60].mean() <= hi


def test_time_dependent_auc_matches_brute_force_and_skips_impossible_horizons() -> None:
    t, e, r = small_cohort(seed=10)
    times = (0.5, 1.0, 2.0)
    aucs, notes = m.time_dependent_auc(t, e, r, times)
    expected = [brute_force_td_auc(t, e, r, h) for h in times]
    assert [row.auc for row in aucs] == pytest.approx(expected, abs=1e-12)
    assert notes == []

    t, e, r = cohort(300, seed=10)
    late, notes = m.time_dependent_auc(t, e, r, (1.0, float(t.max()) + 1))
    assert late[0].auc is not None and late[1].auc is None
    assert "no patient was followed beyond" in notes[0]
    early, notes = m.time_dependent_auc(t, e, r, (float(t[e == 1].min()) / 2,))
    assert early[0].auc is None and "no deaths occurred within" in notes[0]


def test_adjusted_hazard_ratio_per_sd_recovers_simulated_coefficient() -> None:
    d = simulate()
    out = m.adjusted_hazard_ratios(d["time"], d["event"], d["risk"], d["age"], d["male"])
    hr = out.per_sd
    true_log_hr = 0.7 * np.std(d["risk"], ddof=1)
    assert math.log(hr.ci_low) < true_log_hr < math.log(hr.ci_high)
    assert hr.adjusted_for == ("age", "male") and hr.n == 1500
    assert out.top_vs_bottom.hr > 3 and out.top_vs_bottom.n == 750
    assert set(out.ph_test.p) == {"risk_per_sd", "age", "male"}
    assert out.ph_test.risk_score_violates is False and out.notes == ()
    json.dumps(out.to_json(), allow_nan=False)


def test_proportional_hazards_violation_is_flagged() -> None:
    """Risk effect only in the first year (piecewise-constant hazard): the PH check must notice."""
    rng = np.random.default_rng(13)
    n = 800
    z = rng.normal(size=n)
    early = 0.5 * np.exp(1.5 * z)  # hazard before 1 year; 0.5 for everyone after
    draw = rng.exponential(size=n)
    t_event = np.where(draw < early, draw / early, 1 + (draw - early) / 0.5)
    t_censor = rng.uniform(0.5, 4, n)
    t, e = np.minimum(t_event, t_censor), (t_event <= t_censor).astype(int)
    out = m.adjusted_hazard_ratios(t, e, z)
    assert out.ph_test.risk_score_violates is True
    assert any("proportional-hazards check suggests" in x for x in out.notes)


def test_constant_covariate_is_dropped_with_note() -> None:
    d = simulate(n=300, seed=14)
    out = m.adjusted_hazard_ratios(d["time"], d["event"], d["risk"], d["age"], np.ones(300))
    assert out.per_sd.adjusted_for == ("age",)
    assert any("same sex, so it is not adjusted for sex" in x for x in out.notes)


def test_calibration_small_for_true_model_and_large_for_miscalibrated() -> None:
    d = simulate()
    good = m.calibration(d["time"], d["event"], true_surv(d["lam"]))
    bad = m.calibration(d["time"], d["event"], {h: s**3 for h, s in true_surv(d["lam"]).items()})
    json.dumps(good.to_json(), allow_nan=False)
    assert [h.years for h in good.horizons] == [1.0, 2.0, 5.0]
    assert all(len(h.bins) == 5 and sum(b.n for b in h.bins) == 1500 for h in good.horizons)
    assert good.mean_abs_diff < 0.04 and bad.mean_abs_diff > 0.15
    for h in good.horizons:
        assert h.mean_abs_diff < 0.05
        covered = [b.observed_ci[0] <= b.predicted <= b.observed_ci[1] for b in h.bins]
        assert sum(covered) >= 4  # a correct model sits inside the KM CI in (nearly) every bin
    assert good.notes == ()


def test_calibration_degenerate_gives_notes() -> None:
    t, e, r = cohort(30, seed=15)
    out = m.calibration(t, e, {1.0: np.full(30, 0.5), float(t.max()) + 1: np.full(30, 0.5)})
    assert len(out.horizons[0].bins) == 3  # 30 patients: bins of >= 10
    assert out.horizons[1].bins == () and "no patient was followed that long" in out.notes[0]
    small = m.calibration(t[:5], e[:5], {1.0: np.full(5, 0.5)})
    assert small.mean_abs_diff is None and "fewer than 10" in small.notes[0]
    with pytest.raises(ValueError):
        m.calibration(t, e, {1.0: np.full(30, 1.5)})


def test_evaluate_with_covariates_and_predictions_is_complete() -> None:
    d = simulate(n=400, seed=16)
    out = m.evaluate(
        d["time"],
        d["event"],
        d["risk"],
        n_boot=50,
        age=d["age"],
        male=d["male"],
        surv_pred=true_surv(d["lam"]),
    )
    json.dumps(out.to_json(), allow_nan=False)
    assert out.uno_c_ci[0] <= out.uno_c <= out.uno_c_ci[1]
    g = censoring_km(d["time"], d["event"])  # censoring uniform over 1-8 years: under 10% left by year 8
    assert out.uno_c_tau == max(y for y in range(1, 11) if g(y, left=True) >= 0.1) < 8
    assert all(row.auc > 0.6 for row in out.td_auc)
    assert out.hr_per_sd_adjusted.adjusted_for == ("age", "male")
    assert out.hr_per_sd.adjusted_for == () and out.hr_top_vs_bottom_adjusted.hr > 1
    assert set(out.ph_test.p) == {"risk_per_sd", "age", "male"}
    assert out.age.q1 >= 30 and 0 < out.male_percent < 100
    assert out.calibration.mean_abs_diff < 0.06


@pytest.mark.parametrize("name", DEGENERATE)
def test_evaluate_degenerate_cohorts_with_covariates_give_notes(name: str) -> None:
    t, e, r = DEGENERATE[name]
    n = len(t)
    out = m.evaluate(
        t,
        e,
        r,
        n_boot=20,
        age=np.linspace(40, 80, n),
        male=np.arange(n) % 2,
        surv_pred={1.0: np.full(n, 0.8)},
    )
    json.dumps(out.to_json(), allow_nan=False)
    assert out.notes
    adjusted = (out.hr_per_sd_adjusted, out.hr_top_vs_bottom_adjusted)
    if name == "all_tied_times":  # no timing information: any HR must show no effect
        assert all(hr is None or hr.p > 0.5 for hr in adjusted)
    elif name != "time_zero":
        assert adjusted == (None, None)


@pytest.mark.parametrize(
    "kwargs",
    [{"age": [50.0, 60.0]}, {"age": [50.0, np.nan, 60.0]}, {"male": [0, 1, 2]}, {"surv_pred": {1.0: [0.5]}}],
)
def test_invalid_covariates_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        m.evaluate([1.0, 2.0, 3.0], [1, 0, 1], [0.0, 1.0, 2.0], **kwargs)
