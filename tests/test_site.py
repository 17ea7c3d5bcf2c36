"""A site's round without Flower: train under DP, refuse over budget, evaluate and report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import load_cohort, split_patients
from fahr_core.config import ModelConfig, load_site_config
from fahr_core.models.finetune import GlobalModel, build, from_wire, trainable_part
from fahr_core.privacy.ledger import BudgetExceeded

SPEC = ModelConfig(arch="vit_micro", img_size=112, n_intervals=10)


def federation_start(spec: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The spec (with its base hash) and the first message's tensors, as the server sends them."""
    torch.manual_seed(0)
    global_model, trainable = GlobalModel.start(build(spec), spec)
    return global_model.spec, global_model.outgoing(trainable, with_base=True)


@pytest.mark.slow
def test_round_trains_accounts_and_reports(demo_site):
    cfg = load_site_config(demo_site)
    site = SiteRuntime(cfg)
    spec, start = federation_start(SPEC)
    state, metrics = site.train_round(start, spec, server_round=1, num_rounds=2)
    assert set(state) == set(start) - {"encoder.cls_token", "encoder.pos_embed"}  # the frozen base stays
    assert any(not torch.equal(state[k], start[k]) for k in state)
    assert 0 < metrics["epsilon"] <= cfg.privacy.epsilon
    held_out = split_patients(load_cohort(cfg.data), cfg.test_fraction, cfg.split_seed)[1]
    assert metrics["num-examples"] == 60 - len(held_out)  # every demo photo aligns
    assert metrics["delta"] < 1 / metrics["num-examples"]
    ledger = json.loads(cfg.paths.ledger.read_text())
    assert len(ledger["history"]) == 1 and ledger["epsilon"] == pytest.approx(metrics["epsilon"])

    state, metrics2 = site.train_round(state, spec, server_round=2, num_rounds=2)  # the base it kept
    assert metrics["epsilon"] < metrics2["epsilon"] <= cfg.privacy.epsilon * (1 + 1e-9)
    with pytest.raises(BudgetExceeded):  # a third round was never planned: no budget left for it
        site.train_round(state, spec, server_round=2, num_rounds=2)

    evaluation, summary = site.evaluate(state, spec, {"server_round": 2})
    assert evaluation["num-examples"] == len(held_out) and summary["n"] == len(held_out)
    assert cfg.paths.report_page.exists() and cfg.paths.report_summary.exists()
    assert summary["privacy"]["epsilon"] == pytest.approx(metrics2["epsilon"], abs=5e-5)  # 4 decimals
    assert 0 < summary["privacy"]["epsilon_prv"] < summary["privacy"]["epsilon"]  # PRV: tighter than RDP


def test_bad_cohort_stops_the_site_before_training(demo_site):
    cfg = load_site_config(demo_site)
    csv = cfg.data / "cohort.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(",1,", ",7,", 1) if ",1," in lines[3] else lines[3].replace(",0,", ",7,", 1)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="cohort.csv line 4"):
        SiteRuntime(cfg).train_round(*reversed(federation_start(SPEC)), 1, 1)
    assert not cfg.paths.ledger.exists()


def test_ffa_lora_round_sends_only_b_and_the_head_and_leaves_a_as_shared(demo_site):
    site = SiteRuntime(load_site_config(demo_site))
    spec, start = federation_start(replace(SPEC, finetune="ffa-lora", wire_dtype="bfloat16"))
    trained, metrics = site.train_round(start, spec, server_round=1, num_rounds=1)
    assert set(trained) == set(trainable_part(start, spec))
    assert {k for k in trained if "lora_" in k} == {k for k in start if "lora_B" in k}
    received = from_wire(trainable_part(start, spec), "bfloat16")
    assert all(not torch.equal(trained[k], received[k]) for k in trained if "lora_B" in k)
    assert metrics["epsilon"] > 0


def test_a_photo_failing_qc_moves_no_other_patient(demo_site):
    """Item 9: the split is drawn on the whole validated cohort, so QC outcomes cannot shift it."""
    cfg = load_site_config(demo_site)
    site = SiteRuntime(cfg)
    before = site.load(SPEC.img_size)
    assert len(before.train_cohort) + len(before.test_cohort) == 60
    failing = before.test_cohort.patients[0]
    Image.new("RGB", (200, 200), "white").save(failing.photos[0])  # no face: rejected by alignment
    after = site.load(SPEC.img_size)
    assert after.qc != before.qc
    assert failing.patient_id not in after.train_cohort.patient_ids + after.test_cohort.patient_ids
    kept = [p for p in before.test_cohort.patient_ids if p != failing.patient_id]
    assert after.test_cohort.patient_ids == kept
    assert after.train_cohort.patient_ids == before.train_cohort.patient_ids
