"""Where the survival model starts: the age model folded into the risk head, and its configuration."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from fahr_core.age.model import load_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.views import CENTRED, TEST_SHIFTS, view_shifts
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.config import ConfigError, ModelConfig, PrivacyConfig, TrainConfig, server_config_from_dict
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models import shipped
from fahr_core.models.finetune import BaseMismatch, GlobalModel, prepare, site_model
from fahr_core.models.initial import init_from_age_model, init_problem, initial_model
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.survival.losses import interval_exposure
from fahr_core.train import local
from fahr_core.train.local import SurvivalData, patient_risk, train_dp
from fahr_core.workdir import SiteWorkdir
from fahr_server.cli import app as server_app

AGE_INIT = ModelConfig(arch="vit_micro", init_age_model=str(shipped.AGE_MODEL))


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """48 bundled faces (uint8 crops) spanning the demo's ages."""
    return load_faces(sorted((demo_faces_dir() / "images").iterdir())[::7][:48], 112)


@pytest.mark.parametrize("mode", ["last:1", "head", "full"])
def test_round_zero_risk_is_the_age_models_predicted_age_on_the_log_hazard_scale(faces, mode, tmp_path):
    """What a site builds from the server's first message scores every face as the age model does:
    eta = ln2/8 per year x (predicted age - the age model's training mean), to the LayerNorms' epsilons."""
    age = load_age_model(shipped.AGE_MODEL)
    predicted = predict_ages(age, faces, shifts=CENTRED, mirror=False)  # its own forward pass
    assert predicted.std() > 5  # the faces span decades: a ranking test that can fail
    spec = replace(AGE_INIT, finetune=mode)
    gm, trainable = GlobalModel.start(prepare(initial_model(spec), spec), spec)
    received = gm.outgoing(trainable, with_base=True)
    model = site_model(received, gm.spec, SiteWorkdir(tmp_path).frozen_base)
    eta = model.risk(to_input(faces)).numpy()
    expected = math.log(2) / 8 * (predicted - float(age.age_mean))
    assert np.abs(eta - expected).max() < 1e-3
    assert (np.argsort(eta) == np.argsort(predicted)).all()


def test_a_patients_risk_is_the_age_models_ten_view_prediction_averaged_over_photos(faces):
    """`patient_risk` scores each photo as the mean over the age model's ten test-time views (the
    face and its mirror, centred and moved; an independent path: `predict_ages`' default views for
    a model trained on moves), then averages a patient's photos."""
    age = load_age_model(shipped.AGE_MODEL)
    assert view_shifts(age.train_shift) == TEST_SHIFTS  # the shipped model was trained on moves
    ten = predict_ages(age, faces)
    pair = predict_ages(age, faces, shifts=CENTRED, mirror=True)
    assert np.abs(ten - pair).mean() > 0.1  # the moved views change the answer: a test that can fail
    photos = ((0,), (1, 2), (3, 4, 5)) + tuple((i,) for i in range(6, len(faces)))
    data = SurvivalData(faces, photos, np.ones(len(photos)), np.ones(len(photos), dtype=np.int64))
    risk = patient_risk(initial_model(AGE_INIT), data)
    per_face = math.log(2) / 8 * (ten - float(age.age_mean))
    expected = np.array([per_face[list(idx)].mean() for idx in photos])
    assert np.abs(risk - expected).max() < 1e-3


def _expected_deaths(model: SurvivalViT, x: torch.Tensor, data: SurvivalData, horizon: float) -> float:
    """The deaths the model's hazards predict for these patients over their own follow-up."""
    with torch.no_grad():
        eta, alpha = model.eval()(x)
    k = alpha.shape[1]  # the model's own intervals
    exposure, _ = interval_exposure(torch.from_numpy(data.time), torch.from_numpy(data.event), k, horizon)
    return float((exposure * torch.exp(alpha + eta.unsqueeze(1))).sum())


def test_a_dp_round_from_the_age_start_moves_the_sites_hazard_level_with_the_risk_bias(tmp_path):
    """The server cannot know a site's hazard level, so the start's baseline is far off it. In the
    demo's DP round (last block and head, 3 epochs, batch 16, lr 2e-3, epsilon 8) the risk bias
    must take a real part of that correction (its own lr, `level_lr`): at the weights' lr it barely
    moves, and every patient's gradient then says "lower every risk" into the risk weights for the
    whole federation, which costs held-out C (docs/performance.md#the-sites-hazard-level)."""
    records = load_labelled_faces(demo_faces_dir())[::3][:110]
    age = np.array([r.age for r in records])
    b = math.log(2) / 8  # Gompertz deaths from the true ages: 2% a year at 50, doubling every 8 years
    rate = 0.02 * np.exp(b * (age - 50))
    death = np.log1p(-np.log(np.random.default_rng(0).uniform(size=len(age))) * b / rate) / b
    horizon = 10.0
    data = SurvivalData(
        images=load_faces([r.path for r in records], 112),
        photos=tuple((i,) for i in range(len(records))),
        time=np.minimum(death, horizon).astype(np.float32),
        event=(death < horizon).astype(np.int64),
    )
    assert 15 <= data.event.sum() <= 60
    spec = replace(AGE_INIT, finetune="last:1")
    model = prepare(initial_model(spec), spec)
    x = to_input(data.images)
    risk, bias = model.risk(x).numpy(), float(model.head.risk.bias)
    before = _expected_deaths(model, x, data, horizon) / data.event.sum()
    assert before > 10  # the head's constant baseline is far above this site's hazards
    train = TrainConfig(local_epochs=3, batch_size=16, lr=2e-3)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", 8.0, 1e-5)
    train_dp(model, data, train, PrivacyConfig(epsilon=8.0), ledger, 3, horizon, {"server_round": 1})
    after = _expected_deaths(model, x, data, horizon) / data.event.sum()
    assert abs(math.log(after)) < 0.5 * math.log(before)  # most of the way to the site's level
    assert float(model.head.risk.bias) - bias < -0.3  # measured -0.77 to -0.89; at the weights' lr -0.04
    assert scipy_stats.spearmanr(risk, model.risk(x).numpy()).statistic > 0.97  # measured 0.99


@pytest.mark.parametrize("mode", ["full", "head", "last:1", "lora", "ffa-lora"])
def test_in_every_mode_only_the_risk_bias_trains_at_the_level_lr(mode):
    """The bias alone, undecayed (a decay would pull the level towards a hazard of one a year); the
    per-interval baseline stays at the weights' lr, where DP noise cannot shake the calibration."""
    spec = replace(AGE_INIT, finetune=mode)
    model = prepare(initial_model(spec), spec)
    train = TrainConfig(lr=2e-3, level_lr=0.07, weight_decay=0.01)
    groups = local._optimizer(model, train).param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)
    fast = [(p, g) for g in groups for p in g["params"] if g["lr"] == 0.07]
    assert [p for p, _ in fast] == [model.head.risk.bias] and fast[0][1]["weight_decay"] == 0.0
    slow = {id(p) for g in groups if g["lr"] == 2e-3 and g["weight_decay"] == 0.01 for p in g["params"]}
    assert slow == trainable - {id(model.head.risk.bias)} and id(model.head.baseline.weight) in slow


def test_the_prior_scales_the_risk_and_only_an_age_model_of_the_same_shape_folds(faces):
    age = load_age_model(shipped.AGE_MODEL)
    x = to_input(faces)
    one = initial_model(replace(AGE_INIT, init_log_hr_per_year=0.05)).risk(x)
    two = initial_model(replace(AGE_INIT, init_log_hr_per_year=0.10)).risk(x)
    assert torch.allclose(two, 2 * one, atol=1e-4)
    for bad in (0.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="log_hr_per_year must be a finite number > 0"):
            init_from_age_model(SurvivalViT("vit_micro"), age, bad)
    with pytest.raises(
        ValueError, match=r"\[model\]\.init_age_model: .* is a vit_micro at 112 px, .*\[model\]\.arch"
    ):
        initial_model(replace(AGE_INIT, arch="vit_tiny"))
    with pytest.raises(ValueError, match=r"\[model\]\.init_age_model: .*not a fahr age model"):
        initial_model(replace(AGE_INIT, init_age_model=str(shipped.AGE_ENCODER)))


def test_a_site_holding_the_zero_head_federations_base_refuses_the_age_initialised_one(tmp_path):
    """In "head" mode the encoder's last LayerNorm is frozen, and the fold changed it: the frozen
    base's hash tells the two federations apart, so a site never mixes them."""
    spec = ModelConfig(arch="vit_micro", finetune="head")
    zero = replace(spec, encoder_checkpoint=str(shipped.AGE_ENCODER))
    folded = replace(spec, init_age_model=str(shipped.AGE_MODEL))
    base = SiteWorkdir(tmp_path).frozen_base
    gm_zero, t_zero = GlobalModel.start(prepare(initial_model(zero), zero), zero)
    site_model(gm_zero.outgoing(t_zero, with_base=True), gm_zero.spec, base)
    gm_folded, t_folded = GlobalModel.start(prepare(initial_model(folded), folded), folded)
    assert gm_folded.spec.base_sha256 != gm_zero.spec.base_sha256
    with pytest.raises(BaseMismatch, match="this site's frozen base .* differs from the federation's"):
        site_model(gm_folded.outgoing(t_folded, with_base=False), gm_folded.spec, base)


def test_server_config_names_the_init_fields_it_refuses(tmp_path):
    base = {"federation": {"rounds": 1, "min_sites": 1}}
    good = server_config_from_dict(
        {**base, "model": {"init_age_model": str(shipped.AGE_MODEL)}}, "s.toml", tmp_path
    )
    assert (
        good.model.init_age_model == str(shipped.AGE_MODEL)
        and good.model.init_log_hr_per_year == math.log(2) / 8
    )
    both = {"init_age_model": str(shipped.AGE_MODEL), "encoder_checkpoint": str(shipped.AGE_ENCODER)}
    with pytest.raises(
        ConfigError, match=r"s.toml: \[model\].init_age_model and \[model\].encoder_checkpoint"
    ):
        server_config_from_dict({**base, "model": both}, "s.toml", tmp_path)
    for value in (0.0, -0.05, math.inf):
        with pytest.raises(ConfigError, match=r"s.toml: \[model\].init_log_hr_per_year must be a finite"):
            server_config_from_dict({**base, "model": {"init_log_hr_per_year": value}}, "s.toml", tmp_path)
    with pytest.raises(ConfigError, match=r"\[model\].init_age_model .*age.safetensors not found"):
        server_config_from_dict({**base, "model": {"init_age_model": "age.safetensors"}}, "s.toml", tmp_path)


def test_server_run_refuses_an_init_age_model_that_cannot_start_its_model_before_starting(tmp_path):
    """Read from the file's metadata before any process starts: one line naming the setting."""
    assert init_problem(AGE_INIT) is None
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not weights")
    for arch, init, needle in [
        (
            "vit_tiny",
            shipped.AGE_MODEL,
            "is a vit_micro at 112 px; [model].arch and img_size say vit_tiny at 112",
        ),
        ("vit_micro", shipped.AGE_ENCODER, "not a fahr age model (kind=None)"),
        ("vit_micro", not_weights, "not a safetensors file"),
    ]:
        path = tmp_path / "server.toml"
        path.write_text(
            f"[model]\narch = '{arch}'\ninit_age_model = '{init}'\n[federation]\nworkdir = 'server'\n"
        )
        result = CliRunner().invoke(server_app, ["run", "--config", str(path), "--insecure"])
        assert result.exit_code == 2, result.output
        assert f"error: {path}: [model].init_age_model {init}" in result.output and needle in result.output
