"""Predicted survival curves of the piecewise-exponential hazard model (for calibration).

With interval baselines alpha_k and risk score eta, the hazard is constant inside interval k and
the probability of surviving the whole interval is exp(-exp(alpha_k + eta)), so S(t) is the
product over the intervals that end at or before t, times that survival raised to the completed
fraction of the interval t falls in. This is exactly the model the training loss
(fahr_core.survival.losses.discrete_hazard_nll) fits, so calibration judges the fitted curve itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def survival_at(
    eta: np.ndarray, alpha: np.ndarray, horizon: float, times: Sequence[float]
) -> dict[float, np.ndarray]:
    """S(t) per patient for each t in `times` (t beyond the horizon is skipped: not modelled)."""
    eta = np.asarray(eta, dtype=float)
    alpha = np.asarray(alpha, dtype=float)
    k = len(alpha)
    width = horizon / k
    log_surv = -np.exp(np.clip(alpha[None, :] + eta[:, None], -30, 15))  # (n, K) log P(survive interval)
    out: dict[float, np.ndarray] = {}
    for t in times:
        if not 0 <= t <= horizon:
            continue
        full = min(int(t // width), k)
        frac = t / width - full
        total = log_surv[:, :full].sum(1)
        if full < k:
            total = total + frac * log_surv[:, full]
        out[float(t)] = np.exp(total)
    return out
