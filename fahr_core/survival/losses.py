"""Survival losses.

DP-SGD clips each sample's gradient, which bounds one patient's influence on an update only when
the loss is a sum of per-patient terms. The discrete-time hazard loss below is such a sum, so it
is the loss fahr trains with under DP.

Discrete-time proportional hazards (grouped-time Cox model, complementary log-log link). Follow-up
[0, horizon) is cut into K equal intervals. For patient i with risk score eta_i and interval
baseline alpha_k, the hazard of dying in interval k given survival to its start is

    h_ik = 1 - exp(-exp(alpha_k + eta_i)),

so eta is a log hazard ratio exactly as in a Cox model. Patient i, last seen in interval j_i,
contributes

    l_i = - sum_{k < j_i} log(1 - h_ik)  - d_i log(h_ij_i),

i.e. survival through every interval completed and, if the patient died (d_i = 1), death in
interval j_i. Censored patients add nothing for the interval they were censored in (they are
not known to have survived it). Patients followed past the horizon are censored at it.
The loss of a batch is the mean of the l_i.
"""

from __future__ import annotations

import torch


def interval_targets(
    time: torch.Tensor, event: torch.Tensor, n_intervals: int, horizon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patient: a mask of intervals survived (B, K) and a one-hot of the death interval (B, K)."""
    width = horizon / n_intervals
    beyond = time >= horizon
    last = torch.clamp((time / width).floor().long(), max=n_intervals - 1)
    died = (event > 0) & ~beyond
    k = torch.arange(n_intervals, device=time.device).unsqueeze(0)
    survived = (k < last.unsqueeze(1)) | (beyond.unsqueeze(1))
    death = (k == last.unsqueeze(1)) & died.unsqueeze(1)
    return survived.float(), death.float()


def discrete_hazard_nll(
    eta: torch.Tensor,
    alpha: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    horizon: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of the grouped proportional-hazards model (see the module docstring).

    eta: (B,) risk scores; alpha: (B, K) interval baselines (the same row for every patient).
    """
    survived, death = interval_targets(time, event, alpha.shape[1], horizon)
    z = (alpha + eta.unsqueeze(1)).clamp(-30.0, 15.0)
    log_surv = -torch.exp(z)  # log(1 - h)
    log_haz = torch.log((-torch.expm1(log_surv)).clamp(min=1e-12))  # log(h), stable for small h
    per_patient = -(survived * log_surv + death * log_haz).sum(1)
    if reduction == "none":
        return per_patient
    if reduction == "sum":
        return per_patient.sum()
    if reduction == "mean":
        return per_patient.mean()
    raise ValueError(f"unknown reduction {reduction!r}")
