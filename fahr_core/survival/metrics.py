"""Discrimination and risk-stratification statistics for a survival risk score.

Convention everywhere in fahr: higher ``risk`` = higher hazard = shorter survival. Inputs are 1-D arrays of
``time`` (years, >= 0), ``event`` (1 = death observed, 0 = censored) and ``risk``.

Hospital cohorts can be tiny or event-free, so :func:`evaluate` never raises on a degenerate cohort: a
statistic that cannot be computed is ``None`` and a plain-language reason is added to ``notes``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index

# Below this, a quartile holds two patients or fewer and per-quartile curves and HRs are noise.
MIN_PATIENTS_FOR_QUARTILES = 10
QUARTILE_LABELS = ("Q1 (lowest risk)", "Q2", "Q3", "Q4 (highest risk)")


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


def as_arrays(time: Any, event: Any, risk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coerce and validate inputs; bad inputs are caller bugs, so they raise rather than become notes."""
    t = np.asarray(time, dtype=float).reshape(-1)
    e = np.asarray(event).reshape(-1)
    r = np.asarray(risk, dtype=float).reshape(-1)
    if not len(t) == len(e) == len(r):
        raise ValueError(f"time, event and risk lengths differ: {len(t)}, {len(e)}, {len(r)}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("time must be finite and >= 0")
    if not np.all(np.isin(e, (0, 1))):
        raise ValueError("event must contain only 0 and 1")
    if not np.all(np.isfinite(r)):
        raise ValueError("risk must be finite")
    return t, e.astype(int), r


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index: share of comparable pairs where the patient who died first had the higher risk.

    Returns nan when no pair is comparable (e.g. no deaths), so bootstrap resamples can be skipped.
    """
    try:
        # lifelines scores "higher = longer survival"; our risk means shorter survival, hence -risk.
        return float(concordance_index(time, -np.asarray(risk, dtype=float), event))
    except ZeroDivisionError:  # lifelines' signal for "no admissible pairs"
        return float("nan")


def bootstrap_ci(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    stat: Callable[[np.ndarray, np.ndarray, np.ndarray], float] = harrell_c,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI, resampling patients (not pairs) because patients are the independent units.

    Resamples where ``stat`` is nan (no comparable pair) are skipped; (nan, nan) if none is usable.
    """
    n = len(time)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        value = stat(time[idx], event[idx], risk[idx])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def risk_quartiles(risk: np.ndarray) -> np.ndarray:
    """Quartile index 0 (lowest risk) .. 3 (highest); cutting ranks, not values, keeps tied risks valid."""
    if len(risk) < 4:
        raise ValueError(f"need at least 4 patients to form risk quartiles, got {len(risk)}")
    ranks = pd.Series(np.asarray(risk, dtype=float)).rank(method="first")
    return pd.qcut(ranks, 4, labels=False).to_numpy(dtype=int)


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


def quartile_hazard_ratio(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float | int]:
    """Cox hazard ratio of the top vs the bottom risk quartile: a clinician-readable effect size.

    Only patients in those two quartiles enter the model, with a 0/1 "top quartile" covariate.
    lifelines' ConvergenceWarning is raised as an error because a fit that did not converge (typically all
    deaths in one group) yields a meaningless HR. Raises NotEstimable if the two groups hold no death.
    """
    q = risk_quartiles(risk)
    keep = (q == 0) | (q == 3)
    if not event[keep].any():
        raise NotEstimable(
            "No deaths among patients in the lowest and highest risk quartiles, so their hazard ratio "
            "cannot be estimated."
        )
    df = pd.DataFrame({"time": time[keep], "event": event[keep], "top": (q[keep] == 3).astype(float)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        row = CoxPHFitter().fit(df, duration_col="time", event_col="event").summary.loc["top"]
    return {
        "hr": float(row["exp(coef)"]),
        "ci_low": float(row["exp(coef) lower 95%"]),
        "ci_high": float(row["exp(coef) upper 95%"]),
        "p": float(row["p"]),
        "n": int(keep.sum()),
    }


def quartile_skip_reason(n: int, events: int) -> str | None:
    """Why quartile analyses (KM curves, log-rank, HR) are skipped, or None; shared with the reports."""
    if n < MIN_PATIENTS_FOR_QUARTILES:
        return (
            f"Only {n} patient(s) (fewer than {MIN_PATIENTS_FOR_QUARTILES}): risk quartiles would hold two "
            "patients or fewer, so Kaplan-Meier curves by quartile, the log-rank test and the "
            "top-vs-bottom hazard ratio are not computed."
        )
    if events == 0:
        return (
            "No deaths were observed, so every survival curve stays at 100%: Kaplan-Meier curves by "
            "quartile, the log-rank test and the hazard ratio carry no information and are not computed."
        )
    return None


def median_follow_up(time: np.ndarray, event: np.ndarray) -> float:
    """Median follow-up by reverse Kaplan-Meier (censoring treated as the event).

    Unlike the plain median of times, it is not shortened by early deaths. nan if no one was censored
    or the curve never reaches one half (it is then "not reached").
    """
    if not np.any(event == 0):
        return float("nan")
    return float(KaplanMeierFitter().fit(time, 1 - event).median_survival_time_)


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: undefined numbers become None."""
    return float(x) if np.isfinite(x) else None


def evaluate(time: Any, event: Any, risk: Any, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """All statistics for one cohort as a JSON-serialisable dict; missing values come with a reason in notes.

    Keys: n, events, median_follow_up, c_index, c_index_ci ([lo, hi] or None), logrank_p,
    hr_top_vs_bottom ({hr, ci_low, ci_high, p, n} or None), notes (list of str).
    """
    time, event, risk = as_arrays(time, event, risk)
    n, events = len(time), int(event.sum())
    notes: list[str] = []
    out: dict[str, Any] = {
        "n": n,
        "events": events,
        "median_follow_up": None,
        "c_index": None,
        "c_index_ci": None,
        "logrank_p": None,
        "hr_top_vs_bottom": None,
        "notes": notes,
    }
    if n == 0:
        notes.append("The cohort is empty: no statistic can be computed.")
        return out

    out["median_follow_up"] = _finite(median_follow_up(time, event))
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

    c = harrell_c(time, event, risk)
    if np.isnan(c):
        notes.append(
            "The C-index is undefined: no pair of patients could be compared (a pair needs one patient to "
            "die while the other is still under follow-up)"
            + (", and no deaths were observed." if events == 0 else ".")
        )
    else:
        out["c_index"] = c
        lo, hi = bootstrap_ci(time, event, risk, n_boot=n_boot, seed=seed)
        if np.isnan(lo):
            notes.append("No bootstrap resample contained a comparable pair, so the C-index has no 95% CI.")
        else:
            out["c_index_ci"] = [lo, hi]

    skip = quartile_skip_reason(n, events)
    if skip is not None:
        notes.append(skip)
        return out
    out["logrank_p"] = _finite(logrank_quartiles(time, event, risk_quartiles(risk)))
    if out["logrank_p"] is None:
        notes.append("The log-rank test across risk quartiles gave no finite p-value for this cohort.")
    try:
        hr = quartile_hazard_ratio(time, event, risk)
        out["hr_top_vs_bottom"] = {k: (v if k == "n" else _finite(v)) for k, v in hr.items()}
    except NotEstimable as exc:
        notes.append(str(exc))
    except (ConvergenceError, ConvergenceWarning) as exc:
        reason = str(exc).split(". ")[0]
        notes.append(
            "The Cox model comparing highest vs lowest risk quartile did not converge, usually because "
            f"nearly all deaths fall in one group; the hazard ratio is not reported ({reason})."
        )
    return out
