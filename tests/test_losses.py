"""The DP training loss: correct against a float64 reference, and truly per-patient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fahr_core.survival.losses import (
    LOSSES,
    cox_nll,
    discrete_hazard_nll,
    interval_exposure,
    pairwise_ranking_loss,
    require_dp_valid,
)
from fahr_core.survival.predict import survival_at


def reference_nll(eta, alpha, time, event, horizon):
    """Straight-from-the-formula float64 loop: the exact piecewise-exponential likelihood of (time, event).

    Hazard exp(alpha_k + eta) / width per year inside interval k; the NLL is the cumulative hazard up to
    the (horizon-capped) follow-up time minus, for a death before the horizon, the log hazard at death.
    """
    k_total = len(alpha)
    width = horizon / k_total
    out = []
    for e, t, d in zip(eta, time, event, strict=True):
        t_obs = min(t, horizon)
        total = 0.0
        for k in range(k_total):
            rate = math.exp(alpha[k] + e) / width
            start, stop = k * width, (k + 1) * width
            total += rate * max(0.0, min(t_obs, stop) - start)
            if d == 1 and t < horizon and start <= t < stop:
                total -= math.log(rate)
        out.append(total)
    return np.array(out)


def test_loss_matches_float64_reference():
    rng = np.random.default_rng(0)
    n, k, horizon = 50, 8, 10.0
    eta, alpha = rng.normal(size=n), rng.normal(-2, 0.5, size=k)
    time = np.concatenate([rng.uniform(0, 12, n - 3), [0.0, 10.0, 9.99]])
    event = rng.integers(0, 2, n)
    got = discrete_hazard_nll(
        torch.tensor(eta),
        torch.tensor(alpha).expand(n, k),
        torch.tensor(time),
        torch.tensor(event),
        horizon,
        reduction="none",
    )
    np.testing.assert_allclose(got.numpy(), reference_nll(eta, alpha, time, event, horizon), rtol=1e-9)


def test_exposure_censoring_and_horizon():
    """A patient censored mid-interval was at risk for part of it (the life-table point of item 7)."""
    exposure, death = interval_exposure(
        torch.tensor([2.5, 2.5, 15.0], dtype=torch.float64), torch.tensor([1, 0, 1]), 5, 10.0
    )
    assert exposure.tolist() == [[1, 0.25, 0, 0, 0], [1, 0.25, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert death.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


# Simulation truth for the baseline checks: hazard 0.05/year up to 4 years, then 0.15/year (it changes at
# an interval boundary, so the piecewise-constant model holds exactly); loss to follow-up 0.2/year;
# administrative censoring at the 10-year horizon.
HORIZON, N_INTERVALS, CENSOR_RATE = 10.0, 10, 0.2


def true_cumulative_hazard(t: np.ndarray) -> np.ndarray:
    return 0.05 * np.minimum(t, 4.0) + 0.15 * np.maximum(t - 4.0, 0.0)


def simulate(n: int, seed: int, log_hr: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, event, x): death by inverting the cumulative hazard times exp(log_hr * x); x ~ Bernoulli(.5)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n)
    target = rng.exponential(size=n) / np.exp(log_hr * x)  # cumulative hazard reached at death
    t_death = np.where(target < 0.2, target / 0.05, 4.0 + (target - 0.2) / 0.15)
    t_censor = np.minimum(rng.exponential(1 / CENSOR_RATE, n), HORIZON)
    return np.minimum(t_death, t_censor), (t_death <= t_censor).astype(int), x


def fit(time: np.ndarray, event: np.ndarray, x: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Minimise the training loss over the baseline (and a log hazard ratio for x, if given)."""
    n = len(time)
    alpha = torch.full((N_INTERVALS,), -2.0, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(1, dtype=torch.float64, requires_grad=x is not None)
    xs = torch.tensor(np.zeros(n) if x is None else x, dtype=torch.float64)
    t, e = torch.tensor(time), torch.tensor(event)
    params = [alpha, beta] if x is not None else [alpha]
    opt = torch.optim.LBFGS(params, max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = discrete_hazard_nll(beta * xs, alpha.expand(n, N_INTERVALS), t, e, HORIZON)
        loss.backward()
        return loss

    opt.step(closure)
    return alpha.detach().numpy(), float(beta.detach())


def km_standard_error(t: float, n: int) -> float:
    """Large-sample SD of an estimate of S(t) from n patients of `simulate` (Greenwood's, from the truth).

    Var S(t) ~= S(t)^2 / n * int_0^t hazard(u) / P(still followed at u) du.
    """
    u = np.linspace(0.0, t, 2001)
    hazard = np.where(u < 4.0, 0.05, 0.15)
    at_risk = np.exp(-true_cumulative_hazard(u) - CENSOR_RATE * u)
    integral = float(np.sum((hazard / at_risk)[:-1] * np.diff(u)))
    return math.exp(-true_cumulative_hazard(np.array(t))) * math.sqrt(integral / n)


def test_fitted_baseline_survival_matches_simulation_truth_and_kaplan_meier():
    """Item 7: with 20%/year loss to follow-up the baseline must not be biased low.

    The grouped-time likelihood (censored patients get no exposure in their last interval) gave S(5) about
    0.575 against a true 0.607 here, some ten standard errors off; the exact-exposure likelihood must sit
    within 4 SE of the truth and, on the same data, within 1 SE of lifelines' Kaplan-Meier and
    Nelson-Aalen estimates (which know nothing of fahr's model).
    """
    from lifelines import KaplanMeierFitter, NelsonAalenFitter

    n = 50_000
    time, event, _ = simulate(n, seed=0)
    alpha, _ = fit(time, event)
    times = (1.0, 2.0, 2.5, 5.0, 9.0)
    predicted = survival_at(np.zeros(1), alpha, HORIZON, times)
    km = KaplanMeierFitter().fit(time, event)
    na = NelsonAalenFitter().fit(time, event)
    for t in times:
        se = km_standard_error(t, n)
        s = float(predicted[t][0])
        assert abs(s - math.exp(-float(true_cumulative_hazard(np.array(t))))) < 4 * se, t
        assert abs(s - float(km.survival_function_at_times(t).iloc[0])) < se, t
        assert abs(s - math.exp(-float(na.cumulative_hazard_at_times(t).iloc[0]))) < se, t


def test_risk_score_is_a_log_hazard_ratio():
    """eta enters as a log hazard ratio: the fitted coefficient matches the truth and lifelines' Cox model."""
    import pandas as pd
    from lifelines import CoxPHFitter

    true_log_hr = math.log(2.0)
    time, event, x = simulate(20_000, seed=1, log_hr=true_log_hr)
    _, beta = fit(time, event, x)
    cox = CoxPHFitter().fit(pd.DataFrame({"time": time, "event": event, "x": x}), "time", "event")
    se = float(cox.standard_errors_["x"])
    assert abs(beta - true_log_hr) < 4 * se
    assert abs(beta - float(cox.params_["x"])) < 0.1 * se


def test_higher_risk_fits_earlier_deaths_better():
    time, event = torch.tensor([1.0, 9.0]), torch.tensor([1, 1])
    alpha = torch.full((2, 10), -2.0)
    right = discrete_hazard_nll(torch.tensor([1.0, -1.0]), alpha, time, event, 10.0)
    wrong = discrete_hazard_nll(torch.tensor([-1.0, 1.0]), alpha, time, event, 10.0)
    assert right < wrong


def test_batch_loss_is_mean_of_per_patient_terms():
    """The property DP-SGD needs: the batch loss decomposes into one term per patient."""
    rng = np.random.default_rng(1)
    eta = torch.tensor(rng.normal(size=6))
    alpha = torch.tensor(rng.normal(-2, 0.3, size=4)).expand(6, 4)
    time, event = torch.tensor(rng.uniform(0, 10, 6)), torch.tensor(rng.integers(0, 2, 6))
    whole = discrete_hazard_nll(eta, alpha, time, event, 10.0)
    parts = [
        discrete_hazard_nll(eta[i : i + 1], alpha[i : i + 1], time[i : i + 1], event[i : i + 1], 10.0)
        for i in range(6)
    ]
    assert float(whole) == pytest.approx(float(torch.stack(parts).mean()), rel=1e-12)


# --- Losses that couple patients (Cox, ranking) and the DP registry ----------------------------------


def reference_cox_nll(eta, time, event, ties):
    """Textbook float64 Cox negative partial log-likelihood (sum over distinct death times)."""
    total = 0.0
    for t in sorted({t for t, d in zip(time, event, strict=True) if d}):
        deaths = [i for i in range(len(time)) if time[i] == t and event[i]]
        r = sum(math.exp(eta[j]) for j in range(len(time)) if time[j] >= t)
        s = sum(math.exp(eta[i]) for i in deaths)
        n_d = len(deaths)
        total -= sum(eta[i] for i in deaths)
        for m in range(n_d):
            total += math.log(r - (m / n_d) * s) if ties == "efron" else math.log(r)
    return total


def tied_data(seed, n=40):
    rng = np.random.default_rng(seed)
    eta = rng.normal(size=n)
    time = rng.integers(1, 8, n).astype(float)  # few distinct times: many ties
    event = rng.integers(0, 2, n)
    return eta, time, event


def _cox(eta, time, event, **kw):
    return cox_nll(torch.tensor(eta), torch.tensor(time), torch.tensor(event), **kw)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_matches_textbook_reference(ties, seed):
    eta, time, event = tied_data(seed)
    ref = reference_cox_nll(eta, time, event, ties)
    assert float(_cox(eta, time, event, ties=ties, reduction="sum")) == pytest.approx(ref, rel=1e-10)
    mean = float(_cox(eta, time, event, ties=ties))
    assert mean == pytest.approx(ref / event.sum(), rel=1e-10)
    per = _cox(eta, time, event, ties=ties, reduction="none")
    assert float(per.sum()) == pytest.approx(ref, rel=1e-10)
    assert (per.numpy()[event == 0] == 0).all()


def test_cox_breslow_vs_efron_ties():
    rng = np.random.default_rng(3)
    eta, time, event = rng.normal(size=30), rng.permutation(30).astype(float), rng.integers(0, 2, 30)
    assert float(_cox(eta, time, event, ties="breslow")) == pytest.approx(
        float(_cox(eta, time, event, ties="efron")), rel=1e-12
    )
    eta, time, event = tied_data(4)
    breslow, efron = (
        float(_cox(eta, time, event, ties="breslow")),
        float(_cox(eta, time, event, ties="efron")),
    )
    assert abs(breslow - efron) > 1e-3
    assert efron < breslow  # Efron subtracts from the risk set, so its denominators are smaller


def test_cox_stable_for_large_risks_and_no_events():
    eta, time, event = tied_data(5)
    big = _cox(eta * 1000.0, time, event, ties="efron")
    assert torch.isfinite(big)
    risk = torch.tensor(eta, requires_grad=True)
    zero = cox_nll(risk, torch.tensor(time), torch.zeros(len(eta)))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_higher_risk_for_early_death_lowers_loss(ties):
    time = torch.tensor([1.0, 3.0, 3.0, 5.0, 8.0])
    event = torch.tensor([1, 1, 1, 0, 1])
    risk = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    loss = cox_nll(risk, time, event, ties=ties)
    loss.backward()
    assert risk.grad[0] < 0  # gradient descent raises the early death's risk
    bumped = risk.detach().clone()
    bumped[0] += 0.5
    assert cox_nll(bumped, time, event, ties=ties) < loss


def test_cox_efron_minimiser_matches_lifelines():
    lifelines = pytest.importorskip("lifelines")
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(7)
    n = 60
    x = rng.normal(size=n)
    time = np.ceil(rng.exponential(np.exp(-0.8 * x)) * 4)  # integer times: heavy ties
    event = (rng.uniform(size=n) < 0.75).astype(int)
    assert len(np.unique(time[event == 1])) < event.sum()  # tied death times present
    df = __import__("pandas").DataFrame({"x": x, "T": time, "E": event})
    beta_ll = float(lifelines.CoxPHFitter().fit(df, "T", "E").params_["x"])

    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event)
    res = minimize_scalar(
        lambda b: float(cox_nll(b * xt, tt, et, ties="efron")),
        bounds=(-5, 5),
        method="bounded",
        options={"xatol": 1e-9},
    )
    assert res.x == pytest.approx(beta_ll, abs=1e-3)


def reference_ranking(risk, time, event, sigma):
    total, pairs = 0.0, 0
    for i in range(len(risk)):
        for j in range(len(risk)):
            if event[i] and time[i] < time[j]:
                total += math.log1p(math.exp(-(risk[i] - risk[j]) / sigma))
                pairs += 1
    return total / pairs


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_ranking_matches_double_loop(sigma):
    eta, time, event = tied_data(8, n=25)
    got = pairwise_ranking_loss(torch.tensor(eta), torch.tensor(time), torch.tensor(event), sigma=sigma)
    assert float(got) == pytest.approx(reference_ranking(eta, time, event, sigma), rel=1e-10)


def test_ranking_prefers_concordant_risk():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    event = torch.tensor([1, 1, 0, 1, 1])
    concordant = -time.double()  # earlier death, higher risk
    assert pairwise_ranking_loss(concordant, time, event) < pairwise_ranking_loss(-concordant, time, event)
    nopairs = torch.tensor([1.0, 2.0], requires_grad=True)
    zero = pairwise_ranking_loss(nopairs, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_require_dp_valid():
    require_dp_valid("discrete_hazard")
    assert LOSSES["discrete_hazard"].per_patient
    for name in ("cox_efron", "cox_breslow", "ranking"):
        assert not LOSSES[name].per_patient
        with pytest.raises(ValueError, match=rf"'{name}'.*DP"):
            require_dp_valid(name)
    with pytest.raises(ValueError, match="valid losses: .*discrete_hazard"):
        require_dp_valid("focal")


def test_why_coupled_losses_break_dp():
    """Changing only patient i's data moves the gradient at patient j for Cox, never for discrete hazard."""
    i, j = 0, 3
    time = torch.tensor([1.0, 2.0, 4.0, 6.0, 9.0])
    event = torch.tensor([1, 0, 1, 1, 0])
    eta = torch.tensor([0.2, -0.1, 0.4, 0.0, 0.3], dtype=torch.float64)
    alpha = torch.full((5, 5), -2.0, dtype=torch.float64)
    time2, event2, eta2 = time.clone(), event.clone(), eta.clone()
    time2[i], event2[i], eta2[i] = 7.0, 1, 1.5  # patient i's record and features change; j's do not

    def grad_at_j(loss_fn, eta_, time_, event_):
        r = eta_.clone().requires_grad_(True)
        loss_fn(r, time_, event_).backward()
        return float(r.grad[j])

    for ties in ("efron", "breslow"):
        cox = lambda r, t, e, ties=ties: cox_nll(r, t, e, ties=ties, reduction="sum")  # noqa: E731
        assert abs(grad_at_j(cox, eta, time, event) - grad_at_j(cox, eta2, time2, event2)) > 1e-3
    hazard = lambda r, t, e: discrete_hazard_nll(r, alpha, t, e, 10.0, reduction="sum")  # noqa: E731
    assert grad_at_j(hazard, eta, time, event) == grad_at_j(hazard, eta2, time2, event2)
    # and the per-patient terms themselves: j's term is untouched for discrete hazard, moved for Cox
    before = discrete_hazard_nll(eta, alpha, time, event, 10.0, reduction="none")
    after = discrete_hazard_nll(eta2, alpha, time2, event2, 10.0, reduction="none")
    assert float(before[j]) == float(after[j])
    assert float(cox_nll(eta, time, event, reduction="none")[j]) != float(
        cox_nll(eta2, time2, event2, reduction="none")[j]
    )
