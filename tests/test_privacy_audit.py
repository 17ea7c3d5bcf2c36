"""The empirical privacy audit (benchmarks/privacy_audit.py): its bounds and its verdicts.

The bounds are checked against simulations of mechanisms whose epsilon is known exactly
(randomized response) and against scipy's own exact binomial interval; the audit itself must
flag a broken DP-SGD (no noise, no clipping) and pass the real one, through the real train_dp.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy_audit.py"
_spec = importlib.util.spec_from_file_location("privacy_audit", _PATH)
audit = importlib.util.module_from_spec(_spec)
sys.modules["privacy_audit"] = audit  # dataclasses look their module up by name
_spec.loader.exec_module(audit)


def randomized_response(eps: float, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each bit reported truthfully with probability e^eps / (1 + e^eps): exactly eps-DP per bit."""
    keep = rng.random(truth.shape) < 1 / (1 + math.exp(-eps))
    return np.where(keep, truth, ~truth)


def test_p_value_matches_closed_form_when_every_guess_is_right():
    # all r guesses right under eps-DP: probability (e^eps / (1 + e^eps))^r, no delta
    for eps, r in [(0.5, 10), (2.0, 300), (4.0, 50)]:
        expected = (math.exp(eps) / (1 + math.exp(eps))) ** r
        assert audit.p_value(1000, r, r, eps, 0.0) == pytest.approx(expected, rel=1e-9)


def test_one_run_bound_is_below_and_close_to_the_true_epsilon_of_randomized_response():
    rng = np.random.default_rng(1)
    m, eps = 10_000, 1.0
    bounds = []
    for _ in range(200):
        truth = rng.random(m) < 0.5
        guesses = randomized_response(eps, truth, rng)
        bounds.append(audit.epsilon_lower_bound(m, m, int((guesses == truth).sum()), 0.0, 0.05))
    bounds = np.array(bounds)
    assert (bounds > eps).mean() <= 0.08  # a 95% bound: about 5% of runs may exceed the truth
    assert np.median(bounds) > eps - 0.1  # and with 10,000 canaries it is close to it


def test_delta_term_keeps_the_bound_valid_when_delta_leaks_everything():
    # (eps, delta)-DP for every canary: with probability delta the mechanism publishes every bit,
    # else randomized response. One run in ten is then all-correct; only the delta term of the
    # bound stops those runs from "refuting" the true epsilon.
    rng = np.random.default_rng(2)
    m, eps, delta = 200, 1.0, 0.1
    bounds = []
    for _ in range(400):
        truth = rng.random(m) < 0.5
        guesses = truth if rng.random() < delta else randomized_response(eps, truth, rng)
        v = int((guesses == truth).sum())
        bounds.append(audit.epsilon_lower_bound(m, m, v, delta, 0.05))
        assert bounds[-1] <= audit.epsilon_lower_bound(m, m, v, 0.0, 0.05)
    assert (np.array(bounds) > eps).mean() <= 0.08


def test_guessing_rules_keep_the_bound_valid_on_scores():
    # scores from randomized response (one bit each, ties broken at random): the best of all
    # guessing rules must still be a 95% bound, so the Bonferroni correction is doing its job
    rng = np.random.default_rng(3)
    m, eps = 768, 2.0
    bounds = []
    for _ in range(200):
        truth = rng.random(m) < 0.5
        scores = randomized_response(eps, truth, rng) + 0.01 * rng.random(m)
        bounds.append(audit.one_run_bound(scores, truth, 0.0).epsilon)
    assert (np.array(bounds) > eps).mean() <= 0.08
    assert np.median(bounds) > 0.5 * eps  # and not vacuous


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 20), (3, 20), (20, 20), (57, 131)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert audit.clopper_pearson(k, n, 0.05) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_hypothesis_test_bound_is_below_and_close_to_randomized_response():
    rng = np.random.default_rng(4)
    eps, n = 1.0, 5000
    bounds = []
    for _ in range(100):
        said_in_when_in = randomized_response(eps, np.ones(n, bool), rng).sum()
        said_in_when_out = randomized_response(eps, np.zeros(n, bool), rng).sum()
        bounds.append(audit.hypothesis_test_bound(int(said_in_when_in), n, int(said_in_when_out), n, 0.0))
    bounds = np.array(bounds)
    assert (bounds > eps).mean() <= 0.08
    assert np.median(bounds) > eps - 0.15


@pytest.fixture(scope="module")
def tiny_audits() -> dict[str, dict]:
    """The --tiny audit of the real build and of both broken ones (real train_dp, real ledger)."""
    params = audit.AuditParams(**audit.TINY)
    return {
        build: audit.one_run_audit(audit.AuditParams(**{**params.__dict__, "broken": broken}))
        for build, broken in [("real", None), ("noise-off", "noise-off"), ("no-clip", "no-clip")]
    }


def test_tiny_audit_passes_the_real_build(tiny_audits):
    real = tiny_audits["real"]
    assert real["claimed_epsilon"] == pytest.approx(audit.TINY["epsilon"], rel=0.01)
    assert real["empirical_epsilon_lower_bound"] <= real["claimed_epsilon"]


@pytest.mark.parametrize("build", ["noise-off", "no-clip"])
def test_tiny_audit_catches_a_broken_mechanism(tiny_audits, build):
    broken = tiny_audits[build]
    # the ledger still claims the budget: only the mechanism is broken
    assert broken["claimed_epsilon"] == pytest.approx(audit.TINY["epsilon"], rel=0.01)
    assert broken["empirical_epsilon_lower_bound"] > broken["claimed_epsilon"]


def test_unknown_broken_mode_and_too_many_canaries_are_refused():
    with pytest.raises(ValueError, match="--broken must be one of"), audit.broken_build("half-noise"):
        pass
    with pytest.raises(ValueError, match="--canaries must be between 1 and 768"):
        audit.lit_pixel_canaries(769, 32, np.random.default_rng(0))
