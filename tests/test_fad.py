"""Face-age deviation: statistics against independent fits, the report and wire, the age model's delivery.

The semi-synthetic cohort is the simulator's Gompertz law on real faces' labelled ages and sexes, with
one addition the check needs: each patient's face looks `deviation` years older than the patient is
(chronological age = labelled face age - deviation), and hazard follows the face's (biological) age, so
FAD carries a known, positive effect beyond chronological age and sex.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from scipy import stats

from fahr_client.runtime import SiteRuntime
from fahr_core.age.delivery import age_model_payload, receive_age_model
from fahr_core.age.model import AgeViT, load_age_model, save_age_model
from fahr_core.cohort import demo_faces_dir, load_cohort, load_labelled_faces, split_patients
from fahr_core.cohort.simulate import SimulationParams, sample_outcomes
from fahr_core.config import ConfigError, ModelConfig, load_server_config, load_site_config
from fahr_core.models import shipped
from fahr_core.models.finetune import GlobalModel, prepare
from fahr_core.models.vit import SurvivalViT
from fahr_core.protocol.outbound import check_outbound
from fahr_core.protocol.wire import metrics_to_summary, summary_to_metrics
from fahr_core.report.site import write_site_report
from fahr_core.report.summary import PatientScores, SiteContext
from fahr_core.survival.fad import REDUNDANCY_ALARM, fad_statistics
from fahr_core.workdir import REPORT_PAGE, REPORT_SUMMARY


@dataclass(frozen=True)
class FadCohort:
    time: np.ndarray
    event: np.ndarray
    age: np.ndarray  # chronological
    male: np.ndarray
    fad: np.ndarray  # predicted face age - chronological age
    risk: np.ndarray


@pytest.fixture(scope="module")
def cohort() -> FadCohort:
    faces = load_labelled_faces(demo_faces_dir())
    rng = np.random.default_rng(7)
    face_age = np.array([f.age for f in faces])
    male = np.array([f.sex == "M" for f in faces], dtype=float)
    deviation = rng.normal(0.0, 6.0, len(faces))  # looks older (> 0) or younger than one's age
    out = sample_outcomes(face_age, male, 0.03, SimulationParams(), rng)
    predicted = face_age + rng.normal(0.0, 4.0, len(faces))  # a stand-in age model with 4 y error
    risk = 0.05 * face_age + rng.normal(0.0, 1.0, len(faces))  # a survival score that reads some age
    return FadCohort(
        out.time, out.event, face_age - deviation, male, predicted - (face_age - deviation), risk
    )


def _cox(df: pd.DataFrame) -> CoxPHFitter:
    return CoxPHFitter().fit(df, duration_col="time", event_col="event")


def test_fad_statistics_match_independent_fits(cohort):
    c = cohort
    got = fad_statistics(c.time, c.event, c.risk, c.fad, c.age, c.male)
    base = pd.DataFrame({"time": c.time, "event": c.event, "age": c.age, "male": c.male})
    risk_sd = (c.risk - c.risk.mean()) / c.risk.std(ddof=1)
    fad_only = _cox(base.assign(fad=c.fad / 10))
    risk_only = _cox(base.assign(risk=risk_sd))
    both = _cox(base.assign(fad=c.fad / 10, risk=risk_sd))

    hr = got.hr_per_decade
    assert hr.hr == pytest.approx(np.exp(fad_only.params_["fad"]), rel=1e-6)
    lo, hi = np.exp(fad_only.confidence_intervals_.loc["fad"])
    assert [hr.ci_low, hr.ci_high] == pytest.approx([lo, hi], rel=1e-6)
    assert hr.p == pytest.approx(fad_only.summary.loc["fad", "p"], rel=1e-6)
    assert hr.adjusted_for == ("age", "male")
    # the truth: hazard follows the face's age, so looking a decade older raises it (beyond age and sex)
    assert hr.ci_low > 1

    r = np.corrcoef(c.fad, c.risk)[0, 1]
    z, se = np.arctanh(r), 1 / np.sqrt(len(c.fad) - 3)
    corr = got.correlation
    assert corr.pearson == pytest.approx(r, rel=1e-9)
    assert corr.pearson_ci == pytest.approx(np.tanh([z - 1.959964 * se, z + 1.959964 * se]), rel=1e-5)
    assert corr.spearman == pytest.approx(stats.spearmanr(c.fad, c.risk).statistic, rel=1e-9)
    assert corr.redundancy_alarm == (abs(r) > REDUNDANCY_ALARM)

    joint = got.joint
    assert joint.fad_per_decade.hr == pytest.approx(np.exp(both.params_["fad"]), rel=1e-6)
    assert joint.risk_per_sd.hr == pytest.approx(np.exp(both.params_["risk"]), rel=1e-6)
    for term, reduced in (("fad", risk_only), ("risk", fad_only)):
        chi2 = 2 * (both.log_likelihood_ - reduced.log_likelihood_)
        assert getattr(joint.lr_test, term).chi2 == pytest.approx(chi2, rel=1e-6)
        assert getattr(joint.lr_test, term).p == pytest.approx(stats.chi2.sf(chi2, 1), rel=1e-6)


def test_a_risk_score_that_is_apparent_age_sounds_the_alarm(cohort):
    c = cohort
    risk = c.fad + np.random.default_rng(0).normal(0.0, 1.0, len(c.fad))
    got = fad_statistics(c.time, c.event, risk, c.fad, c.age, c.male)
    assert got.correlation.pearson > REDUNDANCY_ALARM and got.correlation.redundancy_alarm
    assert any("Redundancy alarm" in n for n in got.notes)


def test_degenerate_cohorts_give_reasons_not_errors(cohort):
    c = cohort
    few = fad_statistics(c.time[:6], c.event[:6], c.risk[:6], c.fad[:6], c.age[:6], c.male[:6])
    assert few.hr_per_decade is None and few.correlation is None and "fewer than 10" in few.notes[0]
    assert few.mean is None and few.mean_abs is None  # a mean of 6 patients stays at the site
    assert "fad-mean" not in summary_to_metrics({"fad": few.to_json()})
    no_deaths = fad_statistics(c.time, np.zeros_like(c.event), c.risk, c.fad, c.age, c.male)
    assert no_deaths.hr_per_decade is None and no_deaths.correlation is not None
    assert any("No deaths" in n for n in no_deaths.notes)
    with pytest.raises(ValueError, match="fad has 5 values"):
        fad_statistics(c.time, c.event, c.risk, c.fad[:5], c.age, c.male)


def test_report_shows_fad_with_cis_and_sends_only_scalars(cohort, tmp_path):
    c = cohort
    model = {"sha256": "ab" * 32, "arch": "vit_micro", "img_size": 112}
    scores = PatientScores(c.time, c.event, c.risk, age=c.age, male=c.male, fad=c.fad)
    summary = write_site_report(tmp_path, scores, SiteContext("s", {}, {}, age_model=model), n_boot=20)
    expected = fad_statistics(c.time, c.event, c.risk, c.fad, c.age, c.male)
    hr = summary.fad.hr_per_decade.to_json()
    for key in ("hr", "ci_low", "ci_high", "p"):
        assert hr[key] == pytest.approx(getattr(expected.hr_per_decade, key))
    assert summary.fad.correlation.pearson_ci == pytest.approx(expected.correlation.pearson_ci)
    summary = summary.to_json()
    assert summary["fad"]["age_model"]["sha256"] == "ab" * 32
    # summary.json's shape, which readers of the file rely on: a term of the joint model has no n, no
    # covariate list and no SD of its own; the notes are in the summary's one list, not in the section
    hr_keys = {"hr", "ci_low", "ci_high", "p"}
    assert set(summary["fad"]["hr_per_decade"]) == hr_keys | {"n", "adjusted_for"}
    assert set(summary["fad"]["joint"]["risk_per_sd"]) == hr_keys and "notes" not in summary["fad"]
    assert summary["fad"]["joint"]["adjusted_for"] == ["risk_per_sd", "age", "male"]
    assert json.loads((tmp_path / REPORT_SUMMARY).read_text())["fad"] == summary["fad"]
    html = (tmp_path / REPORT_PAGE).read_text()
    assert "Hazard ratio per decade of FAD, adjusted for age and sex" in html
    assert f"{hr['hr']:.2f} (95% CI {hr['ci_low']:.2f}\u2013{hr['ci_high']:.2f})" in html
    assert "ab" * 32 in html

    metrics = summary_to_metrics(summary)
    check_outbound({}, {}, metrics)
    assert metrics["fad-hr-decade-low"] == pytest.approx(hr["ci_low"])
    assert metrics["fad-risk-r-high"] == pytest.approx(expected.correlation.pearson_ci[1])
    back = metrics_to_summary("s", metrics)
    assert back["fad"]["hr_per_decade"]["hr"] == pytest.approx(hr["hr"])
    assert back["fad"]["joint"]["lr_test"]["fad"]["p"] == pytest.approx(expected.joint.lr_test.fad.p)


def test_without_an_age_model_the_report_says_fad_was_not_computed(cohort, tmp_path):
    c = cohort
    scores = PatientScores(c.time, c.event, c.risk, age=c.age)
    summary = write_site_report(tmp_path, scores, SiteContext("s", {}, {}), n_boot=20)
    assert summary.fad is None and "fad-hr-decade" not in summary_to_metrics(summary)
    assert "Face-age deviation (FAD) was not computed" in (tmp_path / REPORT_PAGE).read_text()


def _age_model(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AgeViT("vit_micro", 112)
    torch.nn.init.normal_(model.head.weight, std=0.25)  # a head that varies, so FAD varies
    save_age_model(path, model, {"note": "test"})
    return path


def test_age_model_travels_byte_for_byte(tmp_path):
    path = _age_model(tmp_path / "age.safetensors")
    payload, sha256 = age_model_payload(path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    got = receive_age_model(payload, sha256, tmp_path / "site" / "age.safetensors")
    assert got.sha256 == sha256 and got.describe()["arch"] == "vit_micro"
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(got.model.eval()(x), load_age_model(path).eval()(x))
    tampered = payload.copy()
    tampered[-1] ^= 1
    with pytest.raises(ValueError, match="not the one the server sent"):
        receive_age_model(tampered, sha256, tmp_path / "other.safetensors")
    not_age = tmp_path / "encoder.safetensors"
    not_age.write_bytes(shipped.AGE_ENCODER.read_bytes())
    with pytest.raises(ValueError, match="not a fahr age model"):
        age_model_payload(not_age)


def test_server_config_resolves_and_checks_the_age_checkpoint(tmp_path):
    _age_model(tmp_path / "models" / "age.safetensors")
    toml = tmp_path / "server.toml"
    toml.write_text('[model]\narch = "vit_micro"\nage_checkpoint = "models/age.safetensors"\n')
    assert load_server_config(toml).model.age_checkpoint == str(tmp_path / "models" / "age.safetensors")
    toml.write_text('[model]\nage_checkpoint = "missing.safetensors"\n')
    with pytest.raises(ConfigError, match="age_checkpoint .*missing.safetensors not found"):
        load_server_config(toml)


@pytest.mark.slow
def test_site_evaluation_reports_fad_and_saliency_with_the_received_model(demo_site, tmp_path):
    spec = ModelConfig(arch="vit_micro", img_size=112, n_intervals=10)
    site = SiteRuntime(load_site_config(demo_site))
    torch.manual_seed(0)
    survival = SurvivalViT(spec.arch, spec.img_size, spec.n_intervals)
    torch.nn.init.normal_(survival.head.risk.weight, std=1.0)  # a risk score that varies
    payload, sha256 = age_model_payload(_age_model(tmp_path / "age.safetensors"))
    age_model = site.receive_age_model(payload, sha256)
    global_model, trainable = GlobalModel.start(prepare(survival, spec), spec)
    sent = global_model.outgoing(trainable, with_base=True)
    metrics, summary = site.evaluate(sent, global_model.spec, {}, age_model)
    assert summary["fad"]["age_model"]["sha256"] == sha256 == _kept_sha256(site)
    held_out = split_patients(load_cohort(site.cfg.data), site.cfg.test_fraction, site.cfg.split_seed)[1]
    assert summary["fad"]["n"] == summary["n"] == len(held_out)  # every demo photo aligns
    assert summary["saliency"]["models"] == ["Survival risk score", "Predicted age"]
    assert -1 <= summary["saliency"]["similarity"] < 1
    assert {"fad-mean", "fad-risk-r", "saliency-similarity"} <= set(metrics)
    html = site.cfg.paths.report_page.read_text()
    assert "Where the models look" in html and html.count("data:image/png") >= 2


def _kept_sha256(site: SiteRuntime) -> str:
    """The digest of the file the site kept: what it used is what it reports."""
    return hashlib.sha256(site.cfg.paths.age_model.read_bytes()).hexdigest()
