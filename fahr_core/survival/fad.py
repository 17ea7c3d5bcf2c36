"""Face-age deviation (FAD): does looking older than one's age predict death beyond age, sex and risk score?

FAD = the global age model's predicted (face) age - the patient's chronological age, in years. FAHR-Face
reports three things about it, and so does every site report:

1. the hazard ratio per decade of FAD in a Cox model adjusted for age and sex;
2. the correlation of FAD with the survival risk score: if it is high (|r| above 0.7, the paper's
   redundancy alarm), the survival model may have learnt little more than how old a face looks for its age;
3. one Cox model with FAD and the risk score together (plus age and sex), with a likelihood-ratio test of
   what each adds to the other.

Like :func:`fahr_core.survival.metrics.evaluate`, :func:`fad_statistics` never raises on a degenerate
cohort: what cannot be computed is None, with the reason in ``notes``. The Cox fits are the metrics
module's (same convergence checks, same CI conventions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from scipy import stats

from fahr_core.survival.metrics import (
    NotEstimable,
    adjusters,
    as_arrays,
    as_covariate,
    cox_hr,
    finite,
    model_name,
    term_hazard_ratio,
)
from fahr_core.survival.results import Correlation, FADAnalysis, JointModel, LRTest, LRTests

DECADE = 10.0  # FAD enters the Cox models in decades: an HR per 10 years reads like the paper's
REDUNDANCY_ALARM = 0.7  # |Pearson r| of FAD with the risk score above this: the two may say the same thing
MIN_PATIENTS = 10  # below this a Cox model with up to four covariates is noise


def _correlation(fad: np.ndarray, risk: np.ndarray) -> Correlation:
    """Pearson r with its 95% Fisher-z CI (scipy) and the alarm, plus Spearman's rho (robust to outliers)."""
    pearson = stats.pearsonr(fad, risk)
    ci = pearson.confidence_interval(confidence_level=0.95)  # Fisher z transform, like the Cox CIs' 95%
    spearman = stats.spearmanr(fad, risk)
    r = float(pearson.statistic)
    return Correlation(
        pearson=r,
        pearson_ci=(float(ci.low), float(ci.high)),
        pearson_p=finite(float(pearson.pvalue)),
        spearman=finite(float(spearman.statistic)),
        spearman_p=finite(float(spearman.pvalue)),
        alarm_threshold=REDUNDANCY_ALARM,
        redundancy_alarm=abs(r) > REDUNDANCY_ALARM,
    )


def _lr_test(ll_full: float, ll_reduced: float) -> LRTest:
    """Likelihood-ratio test of one added covariate (1 degree of freedom)."""
    chi2 = max(0.0, 2.0 * (ll_full - ll_reduced))  # a nested fit cannot lose likelihood; clip rounding
    return LRTest(chi2=chi2, df=1, p=finite(float(stats.chi2.sf(chi2, 1))))


def fad_statistics(
    time: Any,
    event: Any,
    risk: Any,
    fad: Any,
    age: Any,
    male: Any = None,
) -> FADAnalysis:
    """FAD's summary, its adjusted hazard ratio, its correlation with ``risk`` and the joint model.

    ``fad`` and ``age`` are years per patient, ``male`` 0/1 (None: adjust for age only). In the result,
    ``hr_per_decade`` is the Cox HR of FAD (+ age + sex), ``correlation`` Pearson r with CI, Spearman's
    rho and the redundancy alarm, and ``joint`` the HR of FAD (per decade) and of the risk score (per SD)
    in one model with age and sex, with ``lr_test`` {fad, risk}: each term's likelihood-ratio test against
    the model without it. Aggregates only; every None has its reason in ``notes``.
    """
    time, event, risk = as_arrays(time, event, risk)
    n = len(time)
    fad = as_covariate(fad, n, "fad")
    adjust = adjusters(as_covariate(age, n, "age"), as_covariate(male, n, "male", binary=True))
    notes: list[str] = []
    if n < MIN_PATIENTS:  # below it even the mean would come close to describing one patient
        notes.append(
            f"Only {n} patient(s) (fewer than {MIN_PATIENTS}): the face-age deviation analyses are not "
            "computed."
        )
        return FADAnalysis(n, notes=tuple(notes))
    described = FADAnalysis(
        n,
        mean=float(fad.mean()),
        sd=finite(float(np.std(fad, ddof=1))),
        mean_abs=float(np.abs(fad).mean()),
    )
    if described.sd in (None, 0.0) or np.ptp(risk) == 0:
        notes.append(
            "The face-age deviation or the risk score is the same for every patient, so neither its "
            "hazard ratio nor its correlation with the risk score is defined."
        )
        return replace(described, notes=tuple(notes))
    correlation = _correlation(fad, risk)
    if correlation.redundancy_alarm:
        notes.append(
            f"Redundancy alarm: the face-age deviation and the risk score are strongly correlated "
            f"(|r| > {REDUNDANCY_ALARM}), so the survival model may mostly be reading how old faces look "
            "for their age."
        )
    decades = fad / DECADE
    risk_sd = (risk - risk.mean()) / float(np.std(risk, ddof=1))
    fad_hr = None
    try:
        fad_hr, fad_fit, _, extra = cox_hr(
            time, event, "fad_per_decade", decades, adjust, model_name("FAD-per-decade", adjust)
        )
        notes += extra
        _, risk_fit, _, _ = cox_hr(
            time, event, "risk_per_sd", risk_sd, adjust, model_name("risk-score-per-SD", adjust)
        )
        both_hr, both_fit, _, _ = cox_hr(
            time,
            event,
            "fad_per_decade",
            decades,
            {"risk_per_sd": risk_sd, **adjust},
            "joint FAD and risk-score",
        )
    except NotEstimable as exc:
        notes.append(str(exc))
        return replace(described, hr_per_decade=fad_hr, correlation=correlation, notes=tuple(notes))
    joint = JointModel(
        fad_per_decade=both_hr,
        risk_per_sd=term_hazard_ratio(both_fit, "risk_per_sd"),
        adjusted_for=both_hr.adjusted_for or (),
        lr_test=LRTests(
            fad=_lr_test(both_fit.log_likelihood_, risk_fit.log_likelihood_),
            risk=_lr_test(both_fit.log_likelihood_, fad_fit.log_likelihood_),
        ),
    )
    return replace(described, hr_per_decade=fad_hr, correlation=correlation, joint=joint, notes=tuple(notes))
