"""The statistics recover what the simulator put in: semi-synthetic cohorts with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, sample_outcomes
from fahr_core.survival.metrics import bootstrap_ci, harrell_c

NO_FRAILTY = SimulationParams(frailty_variance=0.0)


def demo_population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ages and sexes of the bundled real faces, resampled to n patients."""
    faces = load_labelled_faces(demo_faces_dir())
    pick = np.random.default_rng(seed).integers(len(faces), size=n)
    return np.array([faces[i].age for i in pick]), np.array([faces[i].sex == "M" for i in pick])


def test_cox_hazard_ratio_of_true_predictor_recovers_simulated_coefficients():
    age, male = demo_population(4000, seed=0)
    out = sample_outcomes(age, male, 0.02, NO_FRAILTY, np.random.default_rng(1))
    df = pd.DataFrame({"T": out.time, "E": out.event, "age": age - 50, "male": male.astype(float)})
    fit = CoxPHFitter().fit(df, "T", "E")
    ci = fit.confidence_intervals_
    for name, truth in (("age", math.log(2) / 8), ("male", NO_FRAILTY.sex_log_hr)):
        assert ci.loc[name].iloc[0] < truth < ci.loc[name].iloc[1], (name, fit.params_[name], truth)
    # and the linear predictor as one score: log HR per unit is 1
    df_lp = pd.DataFrame({"T": out.time, "E": out.event, "lp": out.linear_predictor})
    lp_ci = CoxPHFitter().fit(df_lp, "T", "E").confidence_intervals_.loc["lp"]
    assert lp_ci.iloc[0] < 1.0 < lp_ci.iloc[1]


def test_c_index_of_true_predictor_approaches_the_oracle_as_n_grows():
    # the oracle: the population concordance of the true predictor, from a very large draw
    age, male = demo_population(60_000, seed=2)
    big = sample_outcomes(age, male, 0.02, SimulationParams(), np.random.default_rng(3))
    sub = np.random.default_rng(4).choice(len(age), 8000, replace=False)
    oracle = harrell_c(big.time[sub], big.event[sub], big.linear_predictor[sub])
    errors, covered = [], 0
    for n in (100, 400, 1600):
        errs = []
        for rep in range(4):
            a, m = demo_population(n, seed=10 + rep)
            out = sample_outcomes(a, m, 0.02, SimulationParams(), np.random.default_rng(100 * n + rep))
            c = harrell_c(out.time, out.event, out.linear_predictor)
            lo, hi = bootstrap_ci(out.time, out.event, out.linear_predictor, n_boot=100, seed=rep)
            covered += lo <= oracle <= hi
            errs.append(abs(c - oracle))
        errors.append(np.mean(errs))
    assert errors[2] < errors[0]  # closer with more patients
    assert errors[2] < 0.03
    assert covered >= 10  # of 12 nominal-95% intervals
