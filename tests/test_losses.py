"""The DP training loss: correct against a float64 reference, and truly per-patient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fahr_core.survival.losses import discrete_hazard_nll, interval_targets


def reference_nll(eta, alpha, time, event, horizon):
    """Straight-from-the-formula float64 loop (module docstring of fahr_core.survival.losses)."""
    k_total = len(alpha)
    width = horizon / k_total
    out = []
    for e, t, d in zip(eta, time, event, strict=True):
        beyond = t >= horizon
        last = min(int(math.floor(t / width)), k_total - 1)
        total = 0.0
        for k in range(k_total):
            h = 1 - math.exp(-math.exp(alpha[k] + e))
            if beyond or k < last:
                total -= math.log(1 - h)
            elif k == last and d == 1:
                total -= math.log(h)
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


def test_targets_censoring_and_horizon():
    survived, death = interval_targets(torch.tensor([2.5, 2.5, 15.0]), torch.tensor([1, 0, 1]), 5, 10.0)
    assert survived.tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert death.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


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
