"""Semi-synthetic multi-site cohorts: real faces, simulated survival with a known truth.

Real outcome-linked face data cannot be shared, so fahr is developed and tested on public faces
whose outcomes are drawn from a Gompertz proportional-hazards model driven by each face's
(labelled) age and sex. Because the true linear predictor is known, a trained model can be scored
against an oracle: the C-index the true risk achieves on the same censored data.

Model, per patient i at site s (time t in years from the photo):

    hazard(t) = z_i * exp(lp_i) * exp(b * t),   lp_i = b * (age_i - 50) + beta_sex * male_i + log(r_s)

with b = gompertz_shape (mortality doubles every ln2/b years of attained age), r_s the site's
death rate per year at age 50 for a woman with z = 1, and z_i ~ Gamma(mean 1, variance theta) an
unobserved frailty. Event times invert the cumulative hazard H(t) = z e^lp (e^{bt} - 1) / b at an
Exp(1) draw; censoring is the earlier of loss to follow-up (exponential) and the end of follow-up.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fahr_core.cohort.faces import FaceRecord
from fahr_core.cohort.schema import COHORT_FILE
from fahr_core.config import SITE_CONFIG_FILE, SiteConfig, dump_site_config
from fahr_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fahr_core.survival.metrics import harrell_c
from fahr_core.workdir import SITE_WORKDIR

TRUTH_FILE = "truth.csv"
TRUTH_SUMMARY_FILE = "truth_summary.json"
PHOTO_DIR = "photos"
# Besides photos/, the files a simulated site folder is made of; overwrite=True replaces only these.
_OWNED_FILES = (COHORT_FILE, TRUTH_FILE, TRUTH_SUMMARY_FILE, SITE_CONFIG_FILE)


@dataclass(frozen=True)
class SimulationParams:
    """Knobs of the simulated federation; per-site tuples have one entry per site.

    The defaults make sites differ the way hospitals do (size, age mix, baseline risk) so that
    federated training meets non-identically distributed data, and they fit the 360 bundled faces.
    """

    n_sites: int = 3
    site_sizes: tuple[int, ...] = (120, 90, 60)  # patients (= faces) per site
    site_mean_ages: tuple[float, ...] = (42.0, 55.0, 68.0)  # centre of each site's age mix
    age_mix_sd: float = 12.0  # spread of the Gaussian weights used to draw faces around that centre
    # Deaths per person-year at age 50 (woman, frailty 1): a sick cohort, so 10 years holds events.
    site_baseline_rates: tuple[float, ...] = (0.02, 0.03, 0.015)
    min_age: float = 18.0  # adults only: the Gompertz law does not describe childhood mortality
    gompertz_shape: float = math.log(2) / 8  # b: mortality doubles every 8 years of age
    sex_log_hr: float = 0.4  # log hazard ratio, male vs female
    frailty_variance: float = 0.3  # theta of the unobserved gamma frailty (mean 1); 0 = none
    max_followup: float = 10.0  # administrative censoring, years after the photo
    censor_rate: float = 0.05  # loss to follow-up per year (exponential); 0 = none

    def __post_init__(self) -> None:
        for name in ("site_sizes", "site_mean_ages", "site_baseline_rates"):
            if len(getattr(self, name)) != self.n_sites:
                raise ValueError(f"SimulationParams.{name} needs {self.n_sites} entries (n_sites)")
        if any(n < 1 for n in self.site_sizes):
            raise ValueError("SimulationParams.site_sizes must all be >= 1")
        if any(r <= 0 for r in self.site_baseline_rates):
            raise ValueError("SimulationParams.site_baseline_rates must all be > 0")
        if self.gompertz_shape <= 0 or self.age_mix_sd <= 0 or self.max_followup <= 0:
            raise ValueError("SimulationParams.gompertz_shape, age_mix_sd and max_followup must be > 0")
        if self.frailty_variance < 0 or self.censor_rate < 0:
            raise ValueError("SimulationParams.frailty_variance and censor_rate must be >= 0")


@dataclass(frozen=True)
class SimulatedOutcomes:
    """Observed (time, event) and the hidden truth behind them, one entry per patient."""

    time: np.ndarray
    event: np.ndarray
    linear_predictor: np.ndarray
    frailty: np.ndarray


def sample_outcomes(
    age: np.ndarray,
    male: np.ndarray,
    baseline_rate: float,
    params: SimulationParams,
    rng: np.random.Generator,
) -> SimulatedOutcomes:
    """Draw censored Gompertz survival for patients of one site (vectorised; no files)."""
    age = np.asarray(age, dtype=float)
    male = np.asarray(male, dtype=float)
    b = params.gompertz_shape
    lp = b * (age - 50.0) + params.sex_log_hr * male + math.log(baseline_rate)
    theta = params.frailty_variance
    frailty = rng.gamma(1.0 / theta, theta, size=age.shape) if theta > 0 else np.ones_like(age)
    # H(T) = E with E ~ Exp(1)  =>  T = log(1 + b E / (z e^lp)) / b
    event_time = np.log1p(b * rng.exponential(size=age.shape) / (frailty * np.exp(lp))) / b
    censor_time = np.full(age.shape, params.max_followup)
    if params.censor_rate > 0:
        censor_time = np.minimum(censor_time, rng.exponential(1.0 / params.censor_rate, size=age.shape))
    event = (event_time <= censor_time).astype(int)
    return SimulatedOutcomes(np.minimum(event_time, censor_time), event, lp, frailty)


def _draw_site_faces(
    faces: list[FaceRecord], params: SimulationParams, rng: np.random.Generator
) -> list[list[FaceRecord]]:
    """Disjoint draws of faces per site, weighted towards each site's mean age."""
    pool = [f for f in faces if f.age >= params.min_age and f.sex in ("M", "F")]
    need = sum(params.site_sizes)
    if need > len(pool):
        raise ValueError(
            f"the simulation needs {need} faces but only {len(pool)} adult (age >= {params.min_age:g}) "
            "faces with a sex label were given; lower SimulationParams.site_sizes"
        )
    remaining = np.arange(len(pool))
    ages = np.array([f.age for f in pool])
    drawn: list[list[FaceRecord]] = []
    for size, mean_age in zip(params.site_sizes, params.site_mean_ages, strict=True):
        weights = np.exp(-0.5 * ((ages[remaining] - mean_age) / params.age_mix_sd) ** 2) + 1e-12
        pick = rng.choice(len(remaining), size=size, replace=False, p=weights / weights.sum())
        drawn.append([pool[i] for i in remaining[pick]])
        remaining = np.delete(remaining, pick)
    return drawn


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _check_site_names(site_names: list[str] | None, n_sites: int) -> list[str]:
    names = site_names if site_names is not None else [f"site_{i + 1}" for i in range(n_sites)]
    if len(names) != n_sites:
        raise ValueError(f"got {len(names)} site names for {n_sites} sites")
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    for name in names:
        if not name or name in (".", "..") or any(c in name for c in "/\\:"):
            raise ValueError(f"site name {name!r} cannot be used as a folder name")
    return names


def simulate_sites(
    faces: list[FaceRecord],
    out_dir: Path,
    params: SimulationParams,
    seed: int,
    site_names: list[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one simulated site folder per site under `out_dir` and return their paths.

    Each folder holds photos/ (copies renamed to `<patient_id>.jpg`, since UTKFace file names
    encode age and sex), cohort.csv (the site data contract), truth.csv and truth_summary.json
    (ground truth for evaluation only; training never reads them) and site.toml with relative
    paths so the folder can be moved. The same faces, params and seed give identical files.
    An existing non-empty site folder is refused unless `overwrite`, which replaces only the
    files listed above (a site's .fahr state, e.g. its privacy ledger, is left alone).
    """
    names = _check_site_names(site_names, params.n_sites)
    out_dir = Path(out_dir)
    site_dirs = [out_dir / name for name in names]
    if not overwrite:
        busy = [str(d) for d in site_dirs if d.is_dir() and any(d.iterdir())]
        if busy:
            raise FileExistsError(
                f"site folder(s) already exist and are not empty: {', '.join(busy)}; "
                "choose another output folder or pass overwrite=True"
            )
    rng = np.random.default_rng(seed)
    drawn = _draw_site_faces(faces, params, rng)
    rates = params.site_baseline_rates
    for name, site_dir, site_faces, rate in zip(names, site_dirs, drawn, rates, strict=True):
        if overwrite:  # the contract file goes first, so no cohort.csv ever names deleted photos
            for file in _OWNED_FILES:
                (site_dir / file).unlink(missing_ok=True)
            shutil.rmtree(site_dir / PHOTO_DIR, ignore_errors=True)
        age = np.array([f.age for f in site_faces])
        male = np.array([f.sex == "M" for f in site_faces])
        _write_site(name, site_dir, site_faces, sample_outcomes(age, male, rate, params, rng), params, seed)
    return site_dirs


def load_truth(site_dir: Path) -> dict[str, float]:
    """The simulator's true linear predictor per patient id, read back from a site's truth.csv.

    Evaluation only (the oracle a model is compared with); training never reads it."""
    with (Path(site_dir) / TRUTH_FILE).open(newline="", encoding="utf-8") as f:
        return {r["patient_id"]: float(r["linear_predictor"]) for r in csv.DictReader(f)}


def _write_site(
    name: str,
    site_dir: Path,
    faces: list[FaceRecord],
    out: SimulatedOutcomes,
    params: SimulationParams,
    seed: int,
) -> None:
    """Write one site folder; cohort.csv last, so a crash never leaves it naming missing photos."""
    ids = [f"{name}-{i + 1:04d}" for i in range(len(faces))]
    photos = [f"{PHOTO_DIR}/{pid}{f.path.suffix.lower()}" for pid, f in zip(ids, faces, strict=True)]
    for photo, face in zip(photos, faces, strict=True):
        atomic_write_bytes(site_dir / photo, face.path.read_bytes())
    truth_rows = [
        [pid, f"{lp:.6f}", f"{z:.6f}"]
        for pid, lp, z in zip(ids, out.linear_predictor, out.frailty, strict=True)
    ]
    truth_header = ["patient_id", "linear_predictor", "frailty"]
    atomic_write_text(site_dir / TRUTH_FILE, _csv_text(truth_header, truth_rows))
    age = np.array([f.age for f in faces])
    atomic_write_json(
        site_dir / TRUTH_SUMMARY_FILE,
        {
            "site": name,
            "seed": seed,
            "n_patients": len(ids),
            "n_events": int(out.event.sum()),
            "censored_fraction": float(1.0 - out.event.mean()),
            "mean_age": float(age.mean()),
            "male_fraction": float(np.mean([f.sex == "M" for f in faces])),
            "oracle_c_index": harrell_c(out.time, out.event, out.linear_predictor),
            "oracle_c_index_with_frailty": harrell_c(
                out.time, out.event, out.linear_predictor + np.log(out.frailty)
            ),
            "params": asdict(params),
        },
    )
    site_cfg = SiteConfig(name=name, data=Path("."), workdir=Path(SITE_WORKDIR))
    dump_site_config(site_cfg, site_dir / SITE_CONFIG_FILE)
    cohort_rows = [
        [pid, photo, f"{t:.4f}", str(e), f"{f.age:g}", f.sex]
        for pid, photo, t, e, f in zip(ids, photos, out.time, out.event, faces, strict=True)
    ]
    header = ["patient_id", "photo", "time", "event", "age", "sex"]
    atomic_write_text(site_dir / COHORT_FILE, _csv_text(header, cohort_rows))
