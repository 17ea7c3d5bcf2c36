"""The semi-synthetic simulator: valid site folders, adults only, the intended Gompertz law."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fahr_core.cohort import demo_faces_dir, load_cohort, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, sample_outcomes, simulate_sites
from fahr_core.config import load_site_config
from fahr_core.workdir import SITE_WORKDIR, SiteWorkdir

PARAMS = SimulationParams()
SMALL = SimulationParams(site_sizes=(20, 15, 10))


@pytest.fixture(scope="module")
def faces():
    return load_labelled_faces(demo_faces_dir())


@pytest.fixture(scope="module")
def sites(faces, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return simulate_sites(faces, tmp_path_factory.mktemp("sim"), PARAMS, seed=7)


def summary(site: Path) -> dict:
    return json.loads((site / "truth_summary.json").read_text(encoding="utf-8"))


def test_site_folders_follow_the_contract(sites: list[Path]) -> None:
    assert [s.name for s in sites] == ["site_1", "site_2", "site_3"]
    for site, size in zip(sites, PARAMS.site_sizes, strict=True):
        cohort = load_cohort(site)
        assert len(cohort) == size == len(list((site / "photos").iterdir()))
        with (site / "truth.csv").open(newline="") as f:
            truth = list(csv.DictReader(f))
        assert [r["patient_id"] for r in truth] == cohort.patient_ids
        assert {"linear_predictor", "frailty"} <= set(truth[0])
        cfg = load_site_config(site / "site.toml")
        assert cfg.name == site.name and cfg.data == site.resolve()
        assert cfg.workdir == site.resolve() / SITE_WORKDIR
        # photos are renamed: UTKFace names start with the age label
        assert all(p.name == f"{pat.patient_id}.jpg" for pat in cohort.patients for p in pat.photos)


def test_faces_are_disjoint_across_sites(sites: list[Path]) -> None:
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for s in sites for p in (s / "photos").iterdir()]
    assert len(digests) == sum(PARAMS.site_sizes) == len(set(digests))


def test_adults_sane_censoring_and_oracle(sites: list[Path]) -> None:
    cohorts = [load_cohort(s) for s in sites]
    ages = np.concatenate([c.age for c in cohorts])
    assert ages.min() >= PARAMS.min_age
    times = np.concatenate([c.time for c in cohorts])
    events = np.concatenate([c.event for c in cohorts])
    assert times.max() <= PARAMS.max_followup and np.all(times[events == 1] < PARAMS.max_followup)
    assert 0.3 < 1 - events.mean() < 0.8
    for site, cohort in zip(sites, cohorts, strict=True):
        info = summary(site)
        assert info["n_patients"] == len(cohort) and info["n_events"] == cohort.event.sum()
        assert info["oracle_c_index"] > 0.6
        assert info["params"]["gompertz_shape"] == pytest.approx(math.log(2) / 8)


def test_sites_differ_in_size_and_age_mix(sites: list[Path]) -> None:
    sizes = [summary(s)["n_patients"] for s in sites]
    mean_ages = [summary(s)["mean_age"] for s in sites]
    assert sizes == list(PARAMS.site_sizes)
    assert mean_ages[1] - mean_ages[0] > 8 and mean_ages[2] - mean_ages[1] > 8


def test_same_seed_same_files_other_seed_differs(faces, tmp_path: Path) -> None:
    a = simulate_sites(faces, tmp_path / "a", SMALL, seed=11)
    b = simulate_sites(faces, tmp_path / "b", SMALL, seed=11)
    c = simulate_sites(faces, tmp_path / "c", SMALL, seed=12)
    for x, y, z in zip(a, b, c, strict=True):
        for name in ("cohort.csv", "truth.csv", "truth_summary.json", "site.toml"):
            assert (x / name).read_bytes() == (y / name).read_bytes()
        assert (x / "cohort.csv").read_bytes() != (z / "cohort.csv").read_bytes()
        assert sorted(p.read_bytes() for p in (x / "photos").iterdir()) == sorted(
            p.read_bytes() for p in (y / "photos").iterdir()
        )


def test_existing_site_folder_needs_overwrite(faces, tmp_path: Path) -> None:
    first = simulate_sites(faces, tmp_path, SMALL, seed=1)
    (first[0] / SITE_WORKDIR).mkdir()
    SiteWorkdir(first[0] / SITE_WORKDIR).ledger.write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError, match="site_1"):
        simulate_sites(faces, tmp_path, SMALL, seed=2)
    assert summary(first[0])["seed"] == 1
    simulate_sites(faces, tmp_path, SimulationParams(site_sizes=(5, 5, 5)), seed=2, overwrite=True)
    assert len(load_cohort(first[0])) == 5 and len(list((first[0] / "photos").iterdir())) == 5
    assert SiteWorkdir(first[0] / SITE_WORKDIR).ledger.read_text(encoding="utf-8") == "{}"


def test_refuses_more_patients_than_adult_faces(faces, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs 400 faces but only 360"):
        simulate_sites(faces, tmp_path, SimulationParams(site_sizes=(200, 100, 100)), seed=0)
    with pytest.raises(ValueError, match="site_mean_ages needs 2 entries"):
        SimulationParams(n_sites=2, site_sizes=(1, 1), site_baseline_rates=(0.1, 0.1))


def cox_fit(time: np.ndarray, event: np.ndarray, x: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Cox partial-likelihood Newton-Raphson (no tied event times), as an independent check."""
    order = np.argsort(-time)  # descending: a cumulative sum then sums over each risk set
    d, X = event[order] == 1, x[order]
    beta = np.zeros(X.shape[1])
    for _ in range(iterations):
        w = np.exp(X @ beta)
        s0 = np.cumsum(w)[d, None]
        s1 = np.cumsum(w[:, None] * X, axis=0)[d]
        s2 = np.cumsum(w[:, None, None] * X[:, :, None] * X[:, None, :], axis=0)[d]
        grad = (X[d] - s1 / s0).sum(axis=0)
        hess = (s2 / s0[:, :, None] - s1[:, :, None] * s1[:, None, :] / s0[:, :, None] ** 2).sum(axis=0)
        beta = beta + np.linalg.solve(hess, grad)
    return beta


def poisson_rate_fit(entry: np.ndarray, exit_: np.ndarray, died: np.ndarray) -> tuple[float, float]:
    """Fit death rate = r50 * exp(slope * (attained age - 50)) from person-years in 1-year age bands."""
    lo = np.arange(np.floor(entry.min()), np.ceil(exit_.max()))
    overlap = np.minimum(exit_[:, None], lo + 1) - np.maximum(entry[:, None], lo)
    exposure = np.clip(overlap, 0, None).sum(axis=0)
    deaths = np.histogram(exit_[died], bins=np.append(lo, lo[-1] + 1))[0]
    x = np.column_stack([np.ones_like(lo), lo + 0.5 - 50])
    beta = np.array([np.log(deaths.sum() / exposure.sum()), 0.0])
    for _ in range(30):  # Newton-Raphson on the Poisson log-likelihood with log(exposure) offset
        mu = exposure * np.exp(x @ beta)
        beta = beta + np.linalg.solve(x.T @ (mu[:, None] * x), x.T @ (deaths - mu))
    return float(np.exp(beta[0])), float(beta[1])


def test_gompertz_mortality_doubles_every_eight_years(faces) -> None:
    ages = np.resize([f.age for f in faces], 20000)
    male = np.arange(20000) % 2 == 1
    params = SimulationParams(frailty_variance=0.0, censor_rate=0.0)
    out = sample_outcomes(ages, male, 0.02, params, np.random.default_rng(0))
    assert 0.2 < out.event.mean() < 0.8
    # In attained age (age at photo + follow-up), women's death rate is 0.02/yr at 50, doubling every 8 years.
    women = ~male
    r50, slope = poisson_rate_fit(ages[women], ages[women] + out.time[women], out.event[women] == 1)
    assert slope == pytest.approx(math.log(2) / 8, abs=0.005)
    assert math.exp(8 * slope) == pytest.approx(2.0, abs=0.1)
    assert r50 == pytest.approx(0.02, rel=0.1)
    # Between patients, the hazard ratio per year of age at the photo is the same, and men's is exp(0.4).
    beta = cox_fit(out.time, out.event, np.column_stack([ages - 50, male]))
    assert beta[0] == pytest.approx(math.log(2) / 8, abs=0.005)
    assert beta[1] == pytest.approx(params.sex_log_hr, abs=0.06)
    expected_lp = params.gompertz_shape * (ages - 50) + 0.4 * male + math.log(0.02)
    np.testing.assert_allclose(out.linear_predictor, expected_lp)


def test_frailty_is_mean_one_gamma_and_unobserved_risk(faces) -> None:
    ages = np.resize([f.age for f in faces], 20000)
    params = SimulationParams(frailty_variance=0.5, censor_rate=0.0)
    out = sample_outcomes(ages, np.zeros(20000, bool), 0.02, params, np.random.default_rng(1))
    assert out.frailty.mean() == pytest.approx(1.0, abs=0.03)
    assert out.frailty.var() == pytest.approx(0.5, abs=0.05)
    # heterogeneity the model cannot see flattens the marginal age effect
    assert cox_fit(out.time, out.event, (ages - 50)[:, None])[0] < 0.9 * math.log(2) / 8
