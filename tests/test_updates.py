"""The server screens updates: malformed, non-finite and outsized ones are rejected with a reason."""

from __future__ import annotations

import pytest
import torch

from fahr_server.screening import screen_updates, update_norm

REF = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.long)}


def site(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": scale * torch.randn(4, 3, generator=g),
        "b": scale * torch.randn(3, generator=g),
        "steps": torch.zeros((), dtype=torch.long),
    }


def test_good_updates_pass():
    assert screen_updates({"a": site(1, 0), "b": site(1, 1), "c": site(1.2, 2)}, REF) == {}


def test_nan_wrong_shape_dtype_and_missing_key_are_rejected():
    nan = site(1, 0)
    nan["w"][0, 0] = float("nan")
    shape = {**site(1, 1), "b": torch.zeros(4)}
    dtype = {**site(1, 2), "b": torch.zeros(3, dtype=torch.float64)}
    missing = {"w": torch.zeros(4, 3), "steps": REF["steps"]}
    reasons = screen_updates({"nan": nan, "shape": shape, "dtype": dtype, "missing": missing}, REF)
    assert "non-finite" in reasons["nan"]
    assert "shape/dtype" in reasons["shape"] and "shape/dtype" in reasons["dtype"]
    assert "missing ['b']" in reasons["missing"]


def test_oversized_update_is_rejected_against_cap_and_against_the_other_sites():
    sites = {"a": site(1, 0), "b": site(1, 1), "c": site(1, 2), "huge": site(100, 3)}
    reasons = screen_updates(sites, REF)
    assert set(reasons) == {"huge"} and "median" in reasons["huge"]
    capped = screen_updates(
        {"a": site(1, 0), "b": site(3, 0)}, REF, max_norm=2 * update_norm(site(1, 0), REF)
    )
    assert set(capped) == {"b"} and "cap" in capped["b"]


def test_federation_reports_the_largest_site_epsilon_not_a_mean():
    from flwr.app import MetricRecord, RecordDict

    from fahr_server.strategy import aggregate_train_metrics

    sites = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": n,
                        "epsilon": e,
                        "train-loss": loss,
                        "epsilon-budget": b,
                        "noise-multiplier": s,
                    }
                )
            }
        )
        for n, e, loss, b, s in ((100, 2.0, 1.0, 4.0, 1.1), (300, 7.5, 2.0, 8.0, 0.7))
    ]
    agg = aggregate_train_metrics(sites, "num-examples")
    assert agg["epsilon-max"] == 7.5 and "epsilon" not in agg
    # budgets and noise levels are each site's own: no mean of them is sent around
    assert "epsilon-budget" not in agg and "noise-multiplier" not in agg
    assert agg["train-loss"] == pytest.approx(1.75)  # everything else stays example-weighted
