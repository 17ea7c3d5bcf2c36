"""The privacy ledger's refusals: concurrent trainings, delta fixed at first spend, budget, resets."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fahr_core.privacy.ledger import (
    LedgerBehindServer,
    PrivacyLedger,
    default_delta,
    encode_spend_on_record,
    locked,
    spend_on_record,
)
from fahr_server.state import read_state
from tests.test_faults import _reply, _strategy

STEP = (1.1, 0.1, 20)


def _spend_once(path: str, start: multiprocessing.synchronize.Barrier, round_no: int) -> None:
    """One training's ledger work in its own process: open, 'train' (hold it a while), record."""
    start.wait()
    with locked(Path(path)):
        ledger = PrivacyLedger.open(Path(path), 50.0, 1e-4)
        time.sleep(0.5)  # the training: long enough that an unlocked twin would read the same history
        ledger.record(STEP, {"server_round": round_no})


def test_two_concurrent_trainings_of_one_site_both_land_in_the_ledger(tmp_path):
    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_spend_once, args=(str(path), start, r)) for r in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ledger = PrivacyLedger.open(path, 50.0, 1e-4)
    assert len(ledger.history) == 2 and sorted(r["server_round"] for r in ledger.rounds) == [1, 2]
    assert ledger.epsilon == pytest.approx(PrivacyLedger(path, 50.0, 1e-4, [STEP, STEP]).epsilon)


def test_default_delta_is_small_for_every_n_and_fixed_at_first_spend(tmp_path):
    for n in (2, 10, 42, 100, 999, 5_000, 10**5, 10**7):
        d = default_delta(n)
        assert d <= min(1e-5, n**-1.1) and n * d <= 1e-3
    path = tmp_path / "l.json"
    first = PrivacyLedger.open(path, 8.0, 0.0, n_train=42)
    assert first.delta == default_delta(42)
    first.record(STEP, {})
    # more patients enrolled (or fewer passing QC): the stored delta holds, the site keeps training
    for n in (4_200, 30):
        again = PrivacyLedger.open(path, 8.0, 0.0, n_train=n)
        assert again.delta == default_delta(42) and again.epsilon == pytest.approx(first.epsilon)
    assert json.loads(path.read_text())["delta"] == default_delta(42)
    with pytest.raises(ValueError, match="delta"):  # an operator changing a configured delta is refused
        PrivacyLedger.open(path, 8.0, 1e-6, n_train=42)


def test_a_delta_not_below_one_over_n_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1/n"):
        PrivacyLedger.open(tmp_path / "l.json", 8.0, 0.05, n_train=20)
    assert PrivacyLedger.open(tmp_path / "l.json", 8.0, 0.04, n_train=20).delta == 0.04


def test_budget_can_be_raised_but_never_lowered(tmp_path):
    path = tmp_path / "l.json"
    PrivacyLedger.open(path, 8.0, 1e-5).record(STEP, {})
    assert PrivacyLedger.open(path, 9.0, 1e-5).budget == 9.0
    with pytest.raises(ValueError, match="budget lowered from 8 to 7"):
        PrivacyLedger.open(path, 7.0, 1e-5)


def test_a_ledger_showing_less_than_the_server_recorded_refuses_to_train(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", 8.0, 1e-5)
    ledger.record(STEP, {})
    ledger.require_server_record(1, ledger.epsilon)  # intact: as much as the server saw
    ledger.require_server_record(0, 0.0)
    with pytest.raises(LedgerBehindServer, match="Restore the ledger backup"):
        ledger.require_server_record(2, ledger.epsilon)
    with pytest.raises(LedgerBehindServer, match="Restore"):
        ledger.require_server_record(1, ledger.epsilon * 1.01)
    fresh = PrivacyLedger.open(tmp_path / "deleted" / "l.json", 8.0, 1e-5)  # .fahr/ deleted, or new workdir
    with pytest.raises(LedgerBehindServer, match="0 round"):
        fresh.require_server_record(1, 0.5)


def test_the_server_counts_each_sites_rounds_and_sends_them_back(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.aggregate_train(1, [_reply(1, "a", {"w": torch.ones(4)}), _reply(2, "b", {"w": torch.ones(4)})])
    strategy.aggregate_train(2, [_reply(1, "a", {"w": torch.ones(4)}), _reply(3, "c", {"w": torch.ones(4)})])
    state = read_state(tmp_path)  # b missed round 2, c joined in it
    assert state.site_rounds == {"a": 2, "b": 1, "c": 1} and state.site_epsilon["b"] == 1.5
    config = {"spend-on-record": encode_spend_on_record(state.site_rounds, state.site_epsilon)}
    assert spend_on_record(config, "a") == (2, 1.5) and spend_on_record(config, "b") == (1, 1.5)
    assert spend_on_record(config, "new-site") is None and spend_on_record({}, "a") is None


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism, sensitivity 1 and noise sigma (Balle & Wang 2018, Thm 8)."""

    def delta_of(eps: float) -> float:
        half = 1 / (2 * sigma)
        return norm.cdf(-eps * sigma + half) - math.exp(eps) * norm.cdf(-eps * sigma - half)

    return brentq(lambda eps: delta_of(eps) - delta, 1e-6, 100)


def test_prv_epsilon_matches_the_exact_gaussian_mechanism_and_is_below_rdp(tmp_path):
    # four full-batch steps at sigma 3 compose to one Gaussian mechanism at sigma 3 / 2
    ledger = PrivacyLedger(tmp_path / "l.json", 10.0, 1e-5, [(3.0, 1.0, 4)])
    exact = analytic_gaussian_epsilon(1.5, 1e-5)
    assert ledger.epsilon_prv == pytest.approx(exact, abs=0.03)
    assert exact < ledger.epsilon < 1.5 * exact  # RDP: a valid bound, looser
