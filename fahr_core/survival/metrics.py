"""Discrimination, risk-stratification and calibration statistics for a survival risk score.

Convention everywhere in fahr: higher ``risk`` = higher hazard = shorter survival. Inputs are 1-D arrays of
``time`` (years, >= 0), ``event`` (1 = death observed, 0 = censored) and ``risk``; optionally ``age``
(years), ``male`` (1 = male, 0 = female) and predicted survival probabilities per horizon.

Hospital cohorts can be tiny or event-free, so :func:`evaluate` never raises on a degenerate cohort: a
statistic that cannot be computed is ``None`` and a plain-language reason is added to ``notes``. Malformed
inputs (wrong lengths, NaN, negative times) are caller bugs and do raise ``ValueError``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from lifelines.statistics import multivariate_logrank_test, proportional_hazard_test
from lifelines.utils import concordance_index
from scipy.linalg import LinAlgWarning

from fahr_core.survival.results import (
    AdjustedHazardRatios,
    AgeSummary,
    Calibration,
    CalibrationAtHorizon,
    CalibrationBin,
    HazardRatio,
    ProportionalHazardsTest,
    SiteEvaluation,
    TimeAUC,
)

# Below this, a quartile holds two patients or fewer and per-quartile curves and HRs are noise.
MIN_PATIENTS_FOR_QUARTILES = 10
QUARTILE_LABELS = ("Q1 (lowest risk)", "Q2", "Q3", "Q4 (highest risk)")
TD_AUC_YEARS = (1.0, 2.0, 5.0)
# Uno's C is truncated at the model horizon at every site, unless fewer than this share of patients would
# still be uncensored just before it: there the 1/G^2 weights explode and a handful of late deaths decide the
# value. tau is then capped at the largest whole year where the share is still at least this.
MIN_CENSORING_SURVIVAL = 0.1
# Calibration bins: up to 5, each of at least 10 patients, so a bin's Kaplan-Meier estimate means something
# and no bin is small enough to point at individual patients.
CALIBRATION_BINS = 5
MIN_PER_CALIBRATION_BIN = 10
# Plain names of the adjustment covariates, for notes.
ADJUSTER_LABELS = {"age": "age", "male": "sex"}


class NotEstimable(ValueError):
    """A statistic is undefined for this cohort; the message says why in words a clinician can read."""


@dataclass(frozen=True)
class KMCurve:
    """Kaplan-Meier estimate for one risk quartile, ready to draw as a step function."""

    quartile: int
    n: int
    events: int
    timeline: np.ndarray
    survival: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def as_time_event(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coerce and validate survival outcomes; bad inputs are caller bugs, so they raise, not become notes."""
    t = np.asarray(time, dtype=float).reshape(-1)
    e = np.asarray(event).reshape(-1)
    if len(t) != len(e):
        raise ValueError(f"time and event lengths differ: {len(t)}, {len(e)}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("time must be finite and >= 0")
    if not np.all(np.isin(e, (0, 1))):
        raise ValueError("event must contain only 0 and 1")
    return t, e.astype(int)


def as_arrays(time: Any, event: Any, risk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`as_time_event` plus a finite risk score of the same length."""
    t, e = as_time_event(time, event)
    r = np.asarray(risk, dtype=float).reshape(-1)
    if len(r) != len(t):
        raise ValueError(f"time, event and risk lengths differ: {len(t)}, {len(e)}, {len(r)}")
    if not np.all(np.isfinite(r)):
        raise ValueError("risk must be finite")
    return t, e, r


def as_covariate(x: Any, n: int, name: str, binary: bool = False) -> np.ndarray | None:
    """Validate an optional per-patient covariate (None passes through); raises like :func:`as_arrays`."""
    if x is None:
        return None
    a = np.asarray(x, dtype=float).reshape(-1)
    if len(a) != n:
        raise ValueError(f"{name} has {len(a)} values for {n} patients")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    if binary and not np.all(np.isin(a, (0.0, 1.0))):
        raise ValueError(f"{name} must contain only 0 and 1")
    return a


def as_surv_pred(surv_pred: Mapping[float, Any] | None, n: int) -> dict[float, np.ndarray] | None:
    """Validate predicted survival probabilities {horizon in years: S(horizon) per patient}."""
    if surv_pred is None:
        return None
    out = {}
    for horizon, values in surv_pred.items():
        h = float(horizon)
        if not np.isfinite(h) or h <= 0:
            raise ValueError(f"calibration horizon must be a positive number of years, got {horizon!r}")
        s = np.asarray(values, dtype=float).reshape(-1)
        if len(s) != n:
            raise ValueError(f"surv_pred[{horizon}] has {len(s)} values for {n} patients")
        if not np.all(np.isfinite(s)) or np.any((s < 0) | (s > 1)):
            raise ValueError(f"surv_pred[{horizon}] must hold probabilities in [0, 1]")
        out[h] = s
    return dict(sorted(out.items()))


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index: share of comparable pairs where the patient who died first had the higher risk.

    Returns nan when no pair is comparable (e.g. no deaths), so bootstrap resamples can be skipped.
    """
    try:
        # lifelines scores "higher = longer survival"; our risk means shorter survival, hence -risk.
        return float(concordance_index(time, -np.asarray(risk, dtype=float), event))
    except ZeroDivisionError:  # lifelines' signal for "no admissible pairs"
        return float("nan")


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """scikit-survival's structured (event, time) array."""
    from sksurv.util import Surv  # heavy import (scikit-learn); only evaluation needs it

    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=float))


def _sksurv_reason(exc: ValueError, what: str) -> str:
    """Turn scikit-survival's error messages into a sentence a clinician can read."""
    msg = str(exc)
    if "all samples are censored" in msg:
        return f"{what} is undefined: no deaths were observed (before the truncation time)."
    if "no comparable pairs" in msg:
        return f"{what} is undefined: no pair of patients could be compared."
    if "censoring survival function is zero" in msg:
        return (
            f"{what} is not computed: by the last death no patient remained uncensored, so the "
            "inverse-probability-of-censoring weights are infinite."
        )
    return f"{what} could not be computed ({msg})."


def uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tau: float | None = None) -> float:
    """Uno's C-index (scikit-survival's ``concordance_index_ipcw``), truncated at ``tau`` years.

    Harrell's C depends on the censoring pattern; Uno's reweights pairs by the inverse probability of
    remaining uncensored, so it estimates the same quantity, the concordance over deaths before ``tau``,
    whatever the censoring, and sites truncated at the same ``tau`` (see :func:`uno_tau`) are comparable.
    The censoring distribution is estimated on the same cohort (train = test), since that is the only data
    a site has. Raises NotEstimable (with a plain reason) when undefined; ``tau=None`` does not truncate.
    """
    from sksurv.metrics import concordance_index_ipcw

    y = _surv(time, event)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 when no pair is comparable: checked below
            value = float(concordance_index_ipcw(y, y, np.asarray(risk, dtype=float), tau=tau)[0])
    except ValueError as exc:
        raise NotEstimable(_sksurv_reason(exc, "Uno's C-index")) from exc
    if not np.isfinite(value):
        raise NotEstimable("Uno's C-index is undefined: no pair of patients could be compared.")
    return value


def censoring_survival_before(time: np.ndarray, event: np.ndarray, t: float) -> float:
    """G(t-): Kaplan-Meier probability of still being uncensored just before ``t`` (deaths are not censoring).

    The same estimate scikit-survival weights Uno's pairs with; 0 beyond the last follow-up, where no one is
    observed and G is unknown.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    if len(time) == 0 or t > time.max():
        return 0.0
    event, time = np.asarray(event).astype(bool), np.asarray(time, dtype=float)
    times, g = kaplan_meier_estimator(event, time, reverse=True)
    before = times < t
    return float(g[before][-1]) if before.any() else 1.0


def uno_tau(time: np.ndarray, event: np.ndarray, horizon: float | None) -> float:
    """The truncation time of Uno's C: the model ``horizon`` for every site, capped where follow-up is short.

    The cap is the largest whole year below the horizon with G(tau-) >= MIN_CENSORING_SURVIVAL (whole years,
    so sites with similar follow-up share a tau and it reads plainly). ``horizon=None`` (no model) starts
    from the last follow-up time. Raises NotEstimable when not even one year qualifies.
    """
    candidates: list[float]
    if horizon is None:
        candidates = list(range(math.floor(float(np.max(time))) if len(time) else 0, 0, -1))
    else:
        candidates = [float(horizon), *range(math.ceil(horizon) - 1, 0, -1)]
    for tau in candidates:
        if censoring_survival_before(time, event, tau) >= MIN_CENSORING_SURVIVAL:
            return float(tau)
    raise NotEstimable(
        f"Uno's C-index is not computed: fewer than {MIN_CENSORING_SURVIVAL:.0%} of patients remained under "
        "follow-up (uncensored) at 1 year, so its inverse-probability-of-censoring weights are unstable."
    )


def bootstrap_ci(
    *arrays: np.ndarray,
    stat: Callable[..., float] = harrell_c,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(*arrays)``, resampling patients (rows of every array together).

    Patients, not pairs, are the independent units. Works for any per-patient statistic, e.g.
    ``bootstrap_ci(time, event, risk, stat=partial(uno_c, tau=2.0))``. Resamples where ``stat`` is nan
    or raises NotEstimable are skipped; (nan, nan) if none is usable.
    """
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            value = stat(*(a[idx] for a in arrays))
        except NotEstimable:
            continue
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def time_dependent_auc(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, times: Sequence[float] = TD_AUC_YEARS
) -> tuple[tuple[TimeAUC, ...], list[str]]:
    """Cumulative/dynamic AUC at each horizon (scikit-survival's ``cumulative_dynamic_auc``).

    AUC(t) answers the clinical question "does the score rank patients who die within t years above those
    still alive at t?". Each horizon is computed on its own so one impossible horizon (beyond the last
    follow-up, or with no death yet) does not hide the others; those get ``auc`` None and a note.
    Returns the AUC per horizon and the notes.
    """
    from sksurv.metrics import cumulative_dynamic_auc

    by_time: list[TimeAUC] = []
    notes: list[str] = []
    y = _surv(time, event) if len(time) else None
    for t in times:
        by_time.append(TimeAUC(float(t), None))
        label = f"The time-dependent AUC at {t:g} year(s)"
        if len(time) == 0 or t >= time.max():
            notes.append(f"{label} is not computed: no patient was followed beyond {t:g} year(s).")
            continue
        if not np.any((time <= t) & (event == 1)):
            notes.append(f"{label} is not computed: no deaths occurred within {t:g} year(s).")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                auc = float(cumulative_dynamic_auc(y, y, risk, [t])[0][0])
        except ValueError as exc:
            notes.append(_sksurv_reason(exc, label))
            continue
        by_time[-1] = TimeAUC(float(t), finite(auc))
        if by_time[-1].auc is None:
            notes.append(f"{label} is undefined for this cohort.")
    return tuple(by_time), notes


def rank_groups(values: np.ndarray, k: int) -> np.ndarray:
    """Group index 0 (lowest value) .. k-1 of equal-size groups; cutting ranks keeps tied values valid."""
    if len(values) < k:
        raise ValueError(f"need at least {k} patients to form {k} groups, got {len(values)}")
    ranks = pd.Series(np.asarray(values, dtype=float)).rank(method="first")
    return pd.qcut(ranks, k, labels=False).to_numpy(dtype=int)


def risk_quartiles(risk: np.ndarray) -> np.ndarray:
    """Quartile index 0 (lowest risk) .. 3 (highest)."""
    return rank_groups(risk, 4)


def km_by_quartile(time: np.ndarray, event: np.ndarray, quartile: np.ndarray) -> list[KMCurve]:
    """Kaplan-Meier curve (with 95% pointwise CI) for each non-empty risk quartile."""
    curves = []
    for q in range(4):
        mask = quartile == q
        if not mask.any():
            continue
        kmf = KaplanMeierFitter().fit(time[mask], event[mask])
        ci = kmf.confidence_interval_
        curves.append(
            KMCurve(
                quartile=q,
                n=int(mask.sum()),
                events=int(event[mask].sum()),
                timeline=kmf.survival_function_.index.to_numpy(dtype=float),
                survival=kmf.survival_function_.iloc[:, 0].to_numpy(dtype=float),
                ci_low=ci.iloc[:, 0].to_numpy(dtype=float),
                ci_high=ci.iloc[:, 1].to_numpy(dtype=float),
            )
        )
    return curves


def logrank_quartiles(time: np.ndarray, event: np.ndarray, quartile: np.ndarray) -> float:
    """p-value of the log-rank test that survival is the same in all four risk quartiles."""
    return float(multivariate_logrank_test(time, quartile, event).p_value)


def adjusters(age: np.ndarray | None, male: np.ndarray | None) -> dict[str, np.ndarray]:
    return {k: v for k, v in (("age", age), ("male", male)) if v is not None}


def cox_hr(
    time: np.ndarray,
    event: np.ndarray,
    term: str,
    values: np.ndarray,
    adjust: Mapping[str, np.ndarray],
    what: str,
) -> tuple[HazardRatio, CoxPHFitter, pd.DataFrame, list[str]]:
    """Fit one Cox model and return the HR of ``term`` with its CI, the fit, its data and notes.

    Adjustment covariates that are constant in these patients are dropped (with a note): they carry no
    information and make the model singular. lifelines' ConvergenceWarning is raised as an error because a
    fit that did not converge (typically all deaths in one group) yields a meaningless HR; likewise
    scipy's LinAlgWarning (a near-singular information matrix).
    """
    if not event.any():
        raise NotEstimable(f"No deaths among the patients of the {what} model, so it cannot be estimated.")
    notes = []
    df = pd.DataFrame({"time": time, "event": event, term: values})
    for name, x in adjust.items():
        if np.ptp(x) == 0:
            notes.append(
                f"All patients in the {what} model have the same {ADJUSTER_LABELS[name]}, so it is not "
                f"adjusted for {ADJUSTER_LABELS[name]}."
            )
        else:
            df[name] = x
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("error", LinAlgWarning)  # ill-conditioned Hessian: the CI would be garbage
        try:
            cph = CoxPHFitter().fit(df, duration_col="time", event_col="event")
        except (ConvergenceError, ConvergenceWarning, LinAlgWarning, np.linalg.LinAlgError) as exc:
            reason = str(exc).split(". ")[0]
            raise NotEstimable(
                f"The Cox model for the {what} hazard ratio did not converge, usually because nearly all "
                f"deaths fall in one group; it is not reported ({reason})."
            ) from exc
    row = cph.summary.loc[term]
    if not (np.isfinite(row["exp(coef) upper 95%"]) and row["exp(coef) lower 95%"] > 0):
        raise NotEstimable(
            f"The {what} hazard ratio is not reported: its 95% confidence interval is unbounded, so these "
            "data carry no information about it (e.g. all deaths at the same time)."
        )
    hr = replace(
        term_hazard_ratio(cph, term), n=len(df), adjusted_for=tuple(c for c in df.columns if c in adjust)
    )
    return hr, cph, df, notes


def term_hazard_ratio(cph: CoxPHFitter, term: str) -> HazardRatio:
    """The HR, 95% CI and Wald p of one term of a fitted Cox model (None where not finite)."""
    row = cph.summary.loc[term]
    return HazardRatio(
        hr=finite(row["exp(coef)"]),
        ci_low=finite(row["exp(coef) lower 95%"]),
        ci_high=finite(row["exp(coef) upper 95%"]),
        p=finite(row["p"]),
    )


def model_name(base: str, adjust: Mapping[str, np.ndarray]) -> str:
    if not adjust:
        return f"unadjusted {base}"
    return f"{base} (adjusted for {' and '.join(ADJUSTER_LABELS[k] for k in adjust)})"


def _top_vs_bottom(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, adjust: Mapping[str, np.ndarray]
) -> tuple[HazardRatio, list[str]]:
    """HR of the top vs bottom risk quartile; only patients in those two quartiles enter the model."""
    q = risk_quartiles(risk)
    keep = (q == 0) | (q == 3)
    what = model_name("highest-vs-lowest-quartile", adjust)
    if not event[keep].any():
        raise NotEstimable(
            "No deaths among patients in the lowest and highest risk quartiles, so their hazard ratio "
            "cannot be estimated."
        )
    sub = {k: v[keep] for k, v in adjust.items()}
    hr, _, _, notes = cox_hr(time[keep], event[keep], "top_quartile", (q[keep] == 3).astype(float), sub, what)
    return hr, notes


def _ph_check(cph: CoxPHFitter, df: pd.DataFrame) -> tuple[ProportionalHazardsTest, list[str]]:
    """Schoenfeld-residual test of proportional hazards (rank time transform) for each covariate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = proportional_hazard_test(cph, df, time_transform="rank")
    p = {str(k): finite(v) for k, v in result.summary["p"].items()}
    notes = []
    risk_p = p.get("risk_per_sd")
    if risk_p is not None and risk_p < 0.05:
        notes.append(
            f"The proportional-hazards check suggests the risk score's effect changes over follow-up "
            f"(p = {risk_p:.3f}): the hazard ratio per SD is an average over time, larger at some "
            "times and smaller at others."
        )
    return ProportionalHazardsTest("rank", p, None if risk_p is None else risk_p < 0.05), notes


def adjusted_hazard_ratios(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    age: np.ndarray | None = None,
    male: np.ndarray | None = None,
    ph_check: bool = True,
) -> AdjustedHazardRatios:
    """Cox hazard ratios of the risk score, adjusted for age and sex (those given; both None = unadjusted).

    Two models, because clinicians and statisticians ask different questions:
    (a) ``top_vs_bottom``: HR of the highest vs the lowest risk quartile (patients in those two quartiles);
    (b) ``per_sd``: HR per standard deviation of the risk score (all patients), plus ``ph_test``, the
    proportional-hazards check of model (b) (p per covariate, rank time transform).
    Adjusting matters because faces reveal age and sex, which predict death on their own: the adjusted HR
    shows what the score adds beyond them. Each HR is a :class:`HazardRatio` (the per-SD one with the
    risk score's ``sd``) or None; every reason for a None is in ``notes``. Never raises on a degenerate
    cohort. ``ph_check=False`` skips the check when a more adjusted model's check will be reported instead.
    """
    time, event, risk = as_arrays(time, event, risk)
    n, events = len(time), int(event.sum())
    adjust = adjusters(as_covariate(age, n, "age"), as_covariate(male, n, "male", binary=True))
    notes: list[str] = []
    skip = quartile_skip_reason(n, events)
    if skip is not None:
        return AdjustedHazardRatios(notes=(skip,))
    top_vs_bottom = None
    try:
        top_vs_bottom, extra = _top_vs_bottom(time, event, risk, adjust)
        notes += extra
    except NotEstimable as exc:
        notes.append(str(exc))
    sd = float(np.std(risk, ddof=1))
    if sd == 0:
        notes.append("All risk scores are identical, so a hazard ratio per standard deviation is undefined.")
        return AdjustedHazardRatios(top_vs_bottom, notes=tuple(notes))
    try:
        what = model_name("per-SD", adjust)
        hr, cph, df, extra = cox_hr(time, event, "risk_per_sd", (risk - risk.mean()) / sd, adjust, what)
        per_sd = replace(hr, sd=sd)
        notes += extra
    except NotEstimable as exc:
        notes.append(str(exc))
        return AdjustedHazardRatios(top_vs_bottom, notes=tuple(notes))
    ph_test = None
    if ph_check:
        try:
            ph_test, extra = _ph_check(cph, df)
            notes += extra
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError) as exc:
            notes.append(f"The proportional-hazards check could not be computed ({exc}).")
    return AdjustedHazardRatios(top_vs_bottom, per_sd, ph_test, tuple(notes))


def quartile_hazard_ratio(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> HazardRatio:
    """Unadjusted Cox HR of the top vs the bottom risk quartile; raises NotEstimable with the reason."""
    return _top_vs_bottom(time, event, risk, {})[0]


def quartile_skip_reason(n: int, events: int) -> str | None:
    """Why quartile analyses (KM curves, log-rank, HRs) are skipped, or None; shared with the reports."""
    if n < MIN_PATIENTS_FOR_QUARTILES:
        return (
            f"Only {n} patient(s) (fewer than {MIN_PATIENTS_FOR_QUARTILES}): risk quartiles would hold two "
            "patients or fewer, so Kaplan-Meier curves by quartile, the log-rank test and the hazard "
            "ratios are not computed."
        )
    if events == 0:
        return (
            "No deaths were observed, so every survival curve stays at 100%: Kaplan-Meier curves by "
            "quartile, the log-rank test and the hazard ratios carry no information and are not computed."
        )
    return None


def _km_at(time: np.ndarray, event: np.ndarray, t: float) -> tuple[float, float, float] | None:
    """Kaplan-Meier S(t) with its 95% CI, or None when t lies beyond the follow-up (S(t) unknown)."""
    kmf = KaplanMeierFitter().fit(time, event)
    s = float(kmf.survival_function_at_times(t).iloc[0])
    if t > time.max() and s > 0:
        return None
    ci = kmf.confidence_interval_.loc[:t].iloc[-1]
    return s, float(ci.iloc[0]), float(ci.iloc[1])


def calibration(time: np.ndarray, event: np.ndarray, surv_pred: Mapping[float, np.ndarray]) -> Calibration:
    """Predicted vs Kaplan-Meier observed survival in up to 5 bins of predicted S(t), per horizon t (years).

    Summary measure: ``mean_abs_diff``, the patient-weighted mean of |mean predicted S(t) - observed
    S(t)| over bins, per horizon and averaged over horizons. It reads directly as "predictions are off by
    about x percentage points", which a clinician can use; a calibration slope fitted to 5 noisy bin
    points would be unstable at site sizes. Bins are quantiles of predicted S(t) (ranks, so ties work),
    with at least ``MIN_PER_CALIBRATION_BIN`` patients each.
    Never raises on a degenerate cohort.
    """
    time, event = as_time_event(time, event)
    preds = as_surv_pred(surv_pred, len(time)) or {}
    notes: list[str] = []
    horizons = []
    n = len(time)
    for t, pred in preds.items():
        horizons.append(CalibrationAtHorizon(t, (), None))
        k = min(CALIBRATION_BINS, n // MIN_PER_CALIBRATION_BIN)
        if k == 0:
            notes.append(
                f"Calibration at {t:g} year(s) is not assessed: fewer than {MIN_PER_CALIBRATION_BIN} "
                "patients, too few for even one bin."
            )
            continue
        if t > time.max():
            notes.append(
                f"Calibration at {t:g} year(s) is not assessed: no patient was followed that long, so the "
                "observed survival is unknown."
            )
            continue
        groups = rank_groups(pred, k)
        unknown = 0
        bins = []
        for g in range(k):
            mask = groups == g
            km = _km_at(time[mask], event[mask], t)
            if km is None:
                unknown += 1
            bins.append(
                CalibrationBin(
                    n=int(mask.sum()),
                    predicted=float(pred[mask].mean()),
                    observed=None if km is None else finite(km[0]),
                    observed_ci=None if km is None else (finite(km[1]), finite(km[2])),
                )
            )
        done = [(b.n, b.predicted, b.observed) for b in bins if b.observed is not None]
        if unknown:
            notes.append(
                f"Calibration at {t:g} year(s): in {unknown} of {k} bin(s) no patient was followed that "
                "long, so observed survival there is unknown."
            )
        mean_abs_diff = None
        if done:
            w = np.array([b_n for b_n, _, _ in done], dtype=float)
            diff = np.array([abs(predicted - observed) for _, predicted, observed in done])
            mean_abs_diff = float(np.sum(w * diff) / w.sum())
        horizons[-1] = CalibrationAtHorizon(t, tuple(bins), mean_abs_diff)
    per_h = [h.mean_abs_diff for h in horizons if h.mean_abs_diff is not None]
    return Calibration(tuple(horizons), float(np.mean(per_h)) if per_h else None, tuple(notes))


def median_follow_up(time: np.ndarray, event: np.ndarray) -> float:
    """Median follow-up by reverse Kaplan-Meier (censoring treated as the event).

    Unlike the plain median of times, it is not shortened by early deaths. nan if no one was censored
    or the curve never reaches one half (it is then "not reached").
    """
    if not np.any(event == 0):
        return float("nan")
    return float(KaplanMeierFitter().fit(time, 1 - event).median_survival_time_)


def demographics(age: np.ndarray | None, male: np.ndarray | None) -> tuple[AgeSummary | None, float | None]:
    """Cohort description: age mean/SD/interquartile range and percent male (None where not supplied)."""
    ages = None
    if age is not None and len(age):
        ages = AgeSummary(
            mean=float(age.mean()),
            sd=finite(float(np.std(age, ddof=1))) if len(age) > 1 else None,
            # quartiles, not min/max: the extremes are two real patients' exact ages
            q1=float(np.percentile(age, 25)),
            q3=float(np.percentile(age, 75)),
        )
    male_percent = float(100.0 * male.mean()) if male is not None and len(male) else None
    return ages, male_percent


def finite(x: float) -> float | None:
    """JSON has no NaN/inf: undefined numbers become None."""
    return float(x) if np.isfinite(x) else None


def _with_ci(
    stat: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    name: str,
    undefined: str,
    n_boot: int,
    seed: int,
) -> tuple[float | None, tuple[float, float] | None, list[str]]:
    """Point estimate and bootstrap CI of a concordance statistic, with the notes explaining any gap."""
    try:
        value = stat(*arrays)
    except NotEstimable as exc:
        return None, None, [str(exc)]
    if not np.isfinite(value):
        return None, None, [undefined]
    lo, hi = bootstrap_ci(*arrays, stat=stat, n_boot=n_boot, seed=seed)
    if np.isnan(lo):
        return value, None, [f"No bootstrap resample contained a comparable pair, so {name} has no 95% CI."]
    return value, (lo, hi), []


def evaluate(
    time: Any,
    event: Any,
    risk: Any,
    n_boot: int = 200,
    seed: int = 0,
    *,
    age: Any = None,
    male: Any = None,
    surv_pred: Mapping[float, Any] | None = None,
    td_auc_years: Sequence[float] = TD_AUC_YEARS,
    horizon: float | None = None,
) -> SiteEvaluation:
    """All statistics for one cohort; what is missing is None, with its reason in ``notes``.

    ``horizon`` is the model's horizon in years: Uno's C is truncated there, the same tau at every site,
    unless this cohort's follow-up is too short (:func:`uno_tau`); ``uno_c_tau`` is the tau used.
    hr_top_vs_bottom and hr_per_sd are unadjusted (see :func:`adjusted_hazard_ratios`); the cohort
    description (age, male_percent), the adjusted HRs and calibration need ``age``/``male``/``surv_pred``.
    ph_test checks the most adjusted per-SD model. Every field is always there (None when not computed),
    so reports need no checks for absent keys.
    """
    time, event, risk = as_arrays(time, event, risk)
    n, events = len(time), int(event.sum())
    age = as_covariate(age, n, "age")
    male = as_covariate(male, n, "male", binary=True)
    preds = as_surv_pred(surv_pred, n)
    notes: list[str] = []
    ages, male_percent = demographics(age, male)
    # the fields computed so far; each return builds the result from them
    out: dict[str, Any] = {
        "n": n,
        "events": events,
        "uno_c_horizon": horizon,
        "age": ages,
        "male_percent": male_percent,
        "td_auc": tuple(TimeAUC(float(t), None) for t in td_auc_years),
    }

    def result() -> SiteEvaluation:
        return SiteEvaluation(**out, notes=tuple(notes))

    if preds:  # first, so even an empty cohort's report says why calibration is missing
        out["calibration"] = calibration(time, event, preds)
        notes += out["calibration"].notes
    if n == 0:
        notes.append("The cohort is empty: no statistic can be computed.")
        return result()

    out["median_follow_up"] = finite(median_follow_up(time, event))
    if out["median_follow_up"] is None:
        notes.append(
            "Median follow-up (reverse Kaplan-Meier) is not reported: too few patients were still alive "
            "and under follow-up for it to be estimated."
        )
    if np.any(time == 0):
        notes.append(
            f"{int(np.sum(time == 0))} patient(s) have zero follow-up time; censored ones add no information."
        )
    if n > 1 and np.all(time == time[0]):
        notes.append(
            "Every patient has the same follow-up time, so no one can be seen to die before anyone else: "
            "only deaths versus survivors at that single time can be compared."
        )
    if 0 < events < 5:
        notes.append(f"Only {events} death(s) observed: every statistic in this report is very uncertain.")

    arrays = (time, event, risk)
    harrell_undefined = (
        "The C-index is undefined: no pair of patients could be compared (a pair needs one patient to "
        "die while the other is still under follow-up)"
        + (", and no deaths were observed." if events == 0 else ".")
    )
    out["c_index"], out["c_index_ci"], extra = _with_ci(
        harrell_c, arrays, "the C-index", harrell_undefined, n_boot, seed
    )
    notes += extra
    try:
        tau = uno_tau(time, event, horizon)
    except NotEstimable as exc:
        notes.append(str(exc))
    else:
        out["uno_c"], out["uno_c_ci"], extra = _with_ci(
            partial(uno_c, tau=tau), arrays, "Uno's C-index", "Uno's C-index is undefined.", n_boot, seed
        )
        notes += extra
        if out["uno_c"] is not None:
            out["uno_c_tau"] = tau

    out["td_auc"], extra = time_dependent_auc(time, event, risk, td_auc_years)
    notes += extra

    skip = quartile_skip_reason(n, events)
    if skip is not None:
        notes.append(skip)
        return result()
    out["logrank_p"] = finite(logrank_quartiles(time, event, risk_quartiles(risk)))
    if out["logrank_p"] is None:
        notes.append("The log-rank test across risk quartiles gave no finite p-value for this cohort.")
    adjust = age is not None or male is not None
    unadjusted = adjusted_hazard_ratios(time, event, risk, ph_check=not adjust)
    out["hr_top_vs_bottom"], out["hr_per_sd"], out["ph_test"] = (
        unadjusted.top_vs_bottom,
        unadjusted.per_sd,
        unadjusted.ph_test,
    )
    notes += unadjusted.notes
    if adjust:
        adjusted = adjusted_hazard_ratios(time, event, risk, age, male)
        out["hr_top_vs_bottom_adjusted"], out["hr_per_sd_adjusted"] = adjusted.top_vs_bottom, adjusted.per_sd
        out["ph_test"] = adjusted.ph_test
        # The unadjusted models already explained shared failures (e.g. no deaths); keep only new reasons.
        notes += [x for x in adjusted.notes if x not in notes]
    return result()
