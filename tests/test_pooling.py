"""Meta-analysis of site results against an independent fit and against simulation truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from fahr_core.survival.pooling import pooled_hazard_ratio, weighted_c_index

Z = stats.norm.ppf(0.975)


def site_estimate(log_hr: float, se: float) -> tuple[float, float, float]:
    """What a site sends: the HR and its 95% Wald CI."""
    return math.exp(log_hr), math.exp(log_hr - Z * se), math.exp(log_hr + Z * se)


def reference_fixed_effect(log_hrs: np.ndarray, ses: np.ndarray) -> tuple[float, float, float]:
    """Fixed effect by maximum likelihood (y_i ~ N(mu, se_i^2)), found numerically; SE from the curvature
    of the log-likelihood by finite differences; I^2 = (Q - df) / Q (Higgins & Thompson 2002)."""

    def nll(mu: float) -> float:
        return float(np.sum(0.5 * ((log_hrs - mu) / ses) ** 2))

    mu = optimize.minimize_scalar(nll, bracket=(-5.0, 5.0), tol=1e-12).x
    h = 1e-4
    curvature = (nll(mu + h) - 2 * nll(mu) + nll(mu - h)) / h**2
    q = float(np.sum(((log_hrs - mu) / ses) ** 2))
    i2 = max(0.0, (q - (len(log_hrs) - 1)) / q) if q > 0 else 0.0
    return mu, 1 / math.sqrt(curvature), i2


def test_pooled_hr_matches_a_maximum_likelihood_fit() -> None:
    rng = np.random.default_rng(1)
    log_hrs, ses = rng.normal(0.3, 0.4, 6), rng.uniform(0.1, 0.6, 6)
    pooled = pooled_hazard_ratio([site_estimate(y, s) for y, s in zip(log_hrs, ses, strict=True)])
    mu, se, i2 = reference_fixed_effect(log_hrs, ses)
    assert pooled is not None and pooled.n_sites == 6
    assert math.log(pooled.hr) == pytest.approx(mu, abs=1e-6)
    assert math.log(pooled.ci_high) - math.log(pooled.ci_low) == pytest.approx(2 * Z * se, rel=1e-4)
    assert pooled.i2 == pytest.approx(i2, abs=1e-6) and pooled.i2 > 0


def test_pooled_ci_covers_the_true_hr_at_its_level_and_i2_sees_heterogeneity() -> None:
    """Simulation truth: sites estimate one true log HR with their own SE; 95% CIs cover it ~95%."""
    rng = np.random.default_rng(2)
    truth, covered, i2_same, i2_differ = 0.4, 0, [], []
    for _ in range(2000):
        ses = rng.uniform(0.1, 0.5, 5)
        same = pooled_hazard_ratio(
            [site_estimate(y, s) for y, s in zip(rng.normal(truth, ses), ses, strict=True)]
        )
        assert same is not None
        covered += same.ci_low < math.exp(truth) < same.ci_high
        i2_same.append(same.i2)
        site_truths = rng.normal(truth, 0.6, 5)  # each site its own true effect
        differ = pooled_hazard_ratio(
            [site_estimate(y, s) for y, s in zip(rng.normal(site_truths, ses), ses, strict=True)]
        )
        assert differ is not None
        i2_differ.append(differ.i2)
    assert 0.935 < covered / 2000 < 0.965
    assert np.median(i2_same) < 0.1 and np.median(i2_differ) > 0.6


@pytest.mark.parametrize(
    "damaged", [(1.0, 0.0, 2.0), ("1.0", 0.5, 2.0), (None, 0.5, 2.0), (2.0, 3.0, 1.0), (True, 0.5, 2.0)]
)
def test_a_site_whose_hr_or_ci_is_not_usable_is_left_out(damaged) -> None:
    # a CI bound of 0 (exp of a huge negative bound underflows) has no log; a string is a damaged summary
    pooled = pooled_hazard_ratio([(2.0, 1.0, 4.0), damaged])
    assert pooled is not None and pooled.n_sites == 1 and pooled.hr == pytest.approx(2.0)
    assert pooled.i2 == 0.0
    assert pooled_hazard_ratio([damaged]) is None and pooled_hazard_ratio([]) is None


def test_weighted_c_index_counts_every_patient_of_the_sites_that_have_one() -> None:
    sites = [(120, 0.7), (300, 0.62), (40, None), (0, 0.9), (-10, 0.9), (55, 0.5)]  # -10: damaged
    got = weighted_c_index(sites)
    patients = np.concatenate([np.full(n, c) for n, c in sites if c is not None and n > 0])
    assert got.mean == pytest.approx(patients.mean()) and got.n == len(patients) == 475
    assert weighted_c_index([(40, None)]) == weighted_c_index([]) and weighted_c_index([]).mean is None
