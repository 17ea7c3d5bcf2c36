"""Privacy: per-patient gradients, one accountant over all rounds, refusal over budget, outbound rules."""

from __future__ import annotations

import json

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy.ledger import BudgetExceeded, PrivacyLedger
from fahr_core.protocol.outbound import OutboundViolation, check_outbound
from fahr_core.survival.losses import discrete_hazard_nll


def test_opacus_per_sample_gradients_equal_single_patient_gradients():
    torch.manual_seed(0)
    model = SurvivalViT("vit_micro", 32, n_intervals=4)
    model.train()
    x = torch.randn(5, 3, 32, 32)
    t, e = torch.tensor([1.0, 3.0, 9.0, 12.0, 0.5]), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    eta, alpha = gsm(x)
    discrete_hazard_nll(eta, alpha, t, e, 10.0).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.clone() for n, p in trainable}
    gsm.remove_hooks()
    # Opacus scales by the batch size under "mean" reduction: grad_sample[i] = grad of loss_i itself.
    for i in range(len(x)):
        model.zero_grad()
        eta_i, alpha_i = model(x[i : i + 1])
        discrete_hazard_nll(eta_i, alpha_i, t[i : i + 1], e[i : i + 1], 10.0).backward()
        for name, p in trainable:
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_root_tokens_keep_opacus_off_functorch():
    model = SurvivalViT("vit_micro", 32)
    assert not model.encoder.cls_token.requires_grad and not model.encoder.pos_embed.requires_grad
    gsm = GradSampleModule(model)
    # no trainable parameter is left without an Opacus layer hook
    assert all(
        type(m).__name__ in {"Linear", "LayerNorm", "Conv2d"}
        for m in gsm.iterate_submodules(model)
        if any(p.requires_grad for p in m.parameters(recurse=False))
    )
    gsm.remove_hooks()


def test_ledger_composes_rounds_in_one_accountant(tmp_path):
    path = tmp_path / "ledger.json"
    rounds = [(1.1, 0.1, 20), (1.1, 0.1, 20), (0.9, 0.2, 10)]
    for r, step in enumerate(rounds):
        ledger = PrivacyLedger.open(path, budget=50.0, delta=1e-4)  # a fresh process each round
        ledger.record(step, {"server_round": r + 1})
    acc = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    final = PrivacyLedger.open(path, budget=50.0, delta=1e-4)
    assert final.epsilon == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
    per_round_sum = sum(PrivacyLedger(tmp_path / "x", 50, 1e-4, [s]).epsilon for s in rounds)
    assert final.epsilon < per_round_sum  # composing is tighter than the naive sum, and not equal to it
    assert json.loads(path.read_text())["rounds"][-1]["epsilon_after"] == pytest.approx(final.epsilon)


def test_calibration_spreads_budget_and_refuses_beyond_it(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", budget=3.0, delta=1e-4)
    q, steps, rounds = 0.1, 20, 3
    for r in range(rounds):
        sigma = ledger.calibrate(q, steps, rounds_left=rounds - r)
        eps = ledger.record((sigma, q, steps), {"server_round": r + 1})
        assert eps <= 3.0 + 1e-9
    assert ledger.epsilon == pytest.approx(3.0, rel=0.02)  # the plan spends the budget, not more
    with pytest.raises(BudgetExceeded, match="budget"):
        ledger.check((sigma, q, steps))
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger.open(tmp_path / "l.json", budget=3.0, delta=1e-5)


def test_corrupt_ledger_refuses_to_train(tmp_path):
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        PrivacyLedger.open(tmp_path / "l.json", 3.0, 1e-4)


def test_outbound_allows_only_model_shaped_weights_and_listed_scalars():
    ref = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    check_outbound({"w": torch.ones(3, 2), "b": torch.ones(2)}, ref, {"num-examples": 10, "epsilon": 1.5})
    with pytest.raises(OutboundViolation, match="extra"):
        check_outbound({**ref, "per_patient_risk": torch.zeros(40)}, ref, {})
    with pytest.raises(OutboundViolation, match="shape"):
        check_outbound({"w": torch.zeros(4, 2), "b": torch.zeros(2)}, ref, {})
    with pytest.raises(OutboundViolation, match="non-finite"):
        check_outbound({"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}, ref, {})
    with pytest.raises(OutboundViolation, match="not on the list"):
        check_outbound({}, {}, {"patient-17-risk": 0.3})
