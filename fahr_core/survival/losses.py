"""Survival losses.

DP-SGD clips each sample's gradient, which bounds one patient's influence on an update only when
the loss is a sum of per-patient terms. The discrete-time hazard loss below is such a sum, so it
is the loss fahr trains with under DP.

Discrete-time proportional hazards with exact exposure (piecewise-exponential model, log link).
Follow-up [0, horizon) is cut into K equal intervals of width w. For patient i with risk score
eta_i and interval baseline alpha_k, the hazard is constant inside interval k,

    lambda_ik = exp(alpha_k + eta_i) / w   (per year),

so eta is a log hazard ratio exactly as in a Cox model, and surviving the whole of interval k has
probability exp(-exp(alpha_k + eta_i)) (the curve fahr_core.survival.predict draws). Patient i,
at risk for a fraction e_ik in [0, 1] of interval k and dying (d_i = 1) in interval j_i,
contributes the exact negative log-likelihood of their follow-up time and status

    l_i = sum_k e_ik exp(alpha_k + eta_i)  -  d_i (alpha_j_i + eta_i - log w).

Why exact exposure: a patient censored inside an interval was at risk for part of it. Giving them
no exposure there (the grouped-time likelihood fahr used before) overstates every interval's
hazard, so the baseline survival came out biased low (S(5) 0.576 against a true 0.607 at 20% a
year censoring); with e_ik the maximum-likelihood interval hazard is deaths / person-time, the
consistent estimate of a hazard that is constant within the interval (tests/test_losses.py checks
the fitted baseline against simulation truth and lifelines' Kaplan-Meier and Nelson-Aalen). The
term is a density, so l_i can be negative. Patients followed past the horizon are censored at it
(full exposure in every interval).
The loss of a batch is the mean of the l_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def interval_exposure(
    time: torch.Tensor, event: torch.Tensor, n_intervals: int, horizon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patient: the share of each interval spent at risk (B, K); one-hot of the death interval (B, K)."""
    width = horizon / n_intervals
    k = torch.arange(n_intervals, device=time.device, dtype=time.dtype).unsqueeze(0)
    exposure = (time.unsqueeze(1) / width - k).clamp(0.0, 1.0)
    died = (event > 0) & (time < horizon)
    last = torch.clamp((time / width).floor().long(), max=n_intervals - 1)
    death = (k.long() == last.unsqueeze(1)) & died.unsqueeze(1)
    return exposure, death.to(time.dtype)


def discrete_hazard_nll(
    eta: torch.Tensor,
    alpha: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    horizon: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of the piecewise-exponential proportional-hazards model (module docstring).

    eta: (B,) risk scores; alpha: (B, K) interval baselines (the same row for every patient).
    """
    exposure, death = interval_exposure(time, event, alpha.shape[1], horizon)
    z = (alpha + eta.unsqueeze(1)).clamp(-30.0, 15.0)
    log_width = math.log(horizon / alpha.shape[1])
    per_patient = (exposure * torch.exp(z)).sum(1) - (death * (z - log_width)).sum(1)
    if reduction == "none":
        return per_patient
    if reduction == "sum":
        return per_patient.sum()
    if reduction == "mean":
        return per_patient.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


# --- Losses that couple patients within a batch (NOT valid under DP-SGD) -----------------------------


def _reduce(per_patient: torch.Tensor, n_terms: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_patient
    if reduction == "sum":
        return per_patient.sum()
    if reduction == "mean":
        return per_patient.sum() / n_terms
    raise ValueError(f"unknown reduction {reduction!r}")


def cox_nll(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "efron",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood, Breslow or Efron ties. NOT valid under DP-SGD.

    risk: (B,) log hazard ratios eta; time: (B,) follow-up; event: (B,) 1 = death, 0 = censored.
    For each distinct death time t with death set D (d = |D| deaths) and risk set
    R(t) = {j : time_j >= t}:

        Breslow:  l_t = - sum_{i in D} eta_i + d * log sum_{j in R(t)} exp(eta_j)
        Efron:    l_t = - sum_{i in D} eta_i
                        + sum_{m=0}^{d-1} log( sum_{j in R(t)} exp(eta_j) - (m/d) sum_{i in D} exp(eta_i) )

    (the two agree when there are no tied death times). The loss is sum_t l_t, divided by the number
    of deaths for reduction="mean"; reduction="none" returns each patient's share (0 if censored).
    With no deaths the result is 0 * risk.sum(), which keeps the autograd graph.

    Computed stably: patients are sorted by time descending, the risk-set log-sums come from a
    cumulative logsumexp read at the end of each tie group, and each Efron term log(R - (m/d) S_D) is
    evaluated as log R + log1p(-(m/d) exp(log S_D - log R)) (finite since S_D <= R and m/d < 1).

    Not DP-valid: every death's term depends on the risk of everyone in its risk set, so the loss is
    not a sum of per-patient terms and per-sample clipping does not bound one patient's influence.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"unknown ties {ties!r}; use 'efron' or 'breslow'")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}")
    event = event > 0
    n_events = event.sum()
    if int(n_events) == 0:
        zero = 0.0 * risk.sum()
        return zero * torch.zeros_like(risk) if reduction == "none" else zero

    order = torch.sort(time, descending=True, stable=True).indices
    eta, t, d = risk[order], time[order], event[order]
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    group_end = torch.cumsum(counts, 0) - 1
    log_risk_set = torch.logcumsumexp(eta, 0)[group_end][group]  # log sum_{R(t_i)} exp(eta), per patient

    denom = log_risk_set
    if ties == "efron":
        ev_idx = torch.nonzero(d).squeeze(1)
        ev_eta, ev_group = eta[ev_idx], group[ev_idx]
        n_groups = counts.shape[0]
        # log S_D per tie group (deaths only), with a per-group max shift.
        gmax = torch.full((n_groups,), -torch.inf, dtype=eta.dtype, device=eta.device)
        gmax = gmax.scatter_reduce(0, ev_group, ev_eta.detach(), reduce="amax")
        shifted = torch.exp(ev_eta - gmax[ev_group])
        sums = torch.zeros(n_groups, dtype=eta.dtype, device=eta.device).index_add(0, ev_group, shifted)
        log_s = torch.log(sums[ev_group]) + gmax[ev_group]
        # m = rank of the death within its tie group; d_g = deaths in the group.
        ev_cum = torch.cumsum(d.long(), 0)
        ev_before = ev_cum - d.long()
        group_start = group_end - counts + 1
        rank = (ev_before - ev_before[group_start][group])[ev_idx]
        d_g = (ev_cum[group_end] - ev_before[group_start])[ev_group]
        frac = rank.to(eta.dtype) / d_g.to(eta.dtype)
        ev_lr = log_risk_set[ev_idx]
        ev_denom = ev_lr + torch.log1p(-frac * torch.exp(log_s - ev_lr))
        denom = torch.zeros_like(eta).index_put((ev_idx,), ev_denom)

    per_sorted = torch.where(d, denom - eta, torch.zeros_like(eta))
    per_patient = torch.empty_like(per_sorted).index_put((order,), per_sorted)
    return _reduce(per_patient, n_events.to(risk.dtype), reduction)


def pairwise_ranking_loss(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, sigma: float = 1.0
) -> torch.Tensor:
    """Smooth C-index surrogate (logistic / softplus form). NOT valid under DP-SGD.

    Higher risk should mean earlier death. Over the comparable pairs
    P = {(i, j) : event_i = 1 and time_i < time_j}, the loss is

        L = (1/|P|) sum_{(i, j) in P} log(1 + exp(-(risk_i - risk_j) / sigma)),

    a smooth convex stand-in for the discordance indicator 1[risk_i <= risk_j] (divided by log 2 it
    bounds that indicator from above). With no comparable pairs it returns 0 * risk.sum().

    Not DP-valid: each pair term involves two patients, so one patient's data affects many terms and
    per-sample clipping does not bound its influence.
    """
    comparable = (event > 0).unsqueeze(1) & (time.unsqueeze(1) < time.unsqueeze(0))
    n_pairs = comparable.sum()
    if int(n_pairs) == 0:
        return 0.0 * risk.sum()
    diff = (risk.unsqueeze(1) - risk.unsqueeze(0)) / sigma
    terms = torch.nn.functional.softplus(-diff)
    return terms[comparable].sum() / n_pairs.to(risk.dtype)


# --- Registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    name: str
    per_patient: bool  # a sum of per-patient terms: the condition for DP-SGD's guarantee
    doc: str
    compute: Callable[..., torch.Tensor]  # (eta, alpha, time, event, horizon) -> batch loss


LOSSES: dict[str, LossSpec] = {
    "discrete_hazard": LossSpec(
        "discrete_hazard",
        True,
        "piecewise-exponential proportional hazards NLL, exact exposure (discrete_hazard_nll); DP-valid",
        discrete_hazard_nll,
    ),
    "cox_efron": LossSpec(
        "cox_efron",
        False,
        "Cox partial likelihood, Efron ties (cox_nll); couples patients",
        lambda eta, alpha, time, event, horizon: cox_nll(eta, time, event, ties="efron"),
    ),
    "cox_breslow": LossSpec(
        "cox_breslow",
        False,
        "Cox partial likelihood, Breslow ties (cox_nll); couples patients",
        lambda eta, alpha, time, event, horizon: cox_nll(eta, time, event, ties="breslow"),
    ),
    "ranking": LossSpec(
        "ranking",
        False,
        "pairwise C-index surrogate (pairwise_ranking_loss); couples patients",
        lambda eta, alpha, time, event, horizon: pairwise_ranking_loss(eta, time, event),
    ),
}


def require_dp_valid(name: str) -> None:
    """Raise ValueError unless loss `name` is a sum of per-patient terms (required by DP-SGD)."""
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    if not spec.per_patient:
        dp_ok = ", ".join(repr(n) for n, s in LOSSES.items() if s.per_patient)
        raise ValueError(
            f"loss {name!r} couples patients within a batch (each patient's term depends on other patients, "
            "e.g. everyone in their risk set or their comparison pairs), so per-sample clipping does not "
            "bound one patient's influence and the DP guarantee would not hold; "
            f"use {dp_ok} under DP"
        )
