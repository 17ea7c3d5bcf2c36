"""What an age-based start can reach on simulated sites' held-out patients, in expectation over many seeds.

The privacy-utility curve (`privacy_utility.py`) runs a few seeds, and with 6-23 deaths per site
a seed's held-out C moves by several hundredths. This benchmark runs no federation: it draws the
demo's three sites for each of many seeds (the same `simulate_sites` draws, the sites' own split
of 30%), from the bundled faces or, with `--data`, from the validation part of the model build's
fixed split (faces the age model never saw, as the build's warm-start stage draws its sites), and
scores each site's held-out patients with risk scores that need no training: the simulator's true
linear predictor (the oracle), the true age alone, and the age model's predicted age (what the
untrained `init_age_model` start ranks by: the fold of its head into the risk head is exact,
docs/models.md) from its forward pass alone, as the mean over the face and its mirror image, as
the mean over its ten test-time views (what `patient_risk` averages), and that mean plus the true
sex at the simulator's log hazard ratio. So it says how much of the goal's gap is the start's, and
how much a seed's luck moves it.

    python benchmarks/start_ceiling.py --seeds 200
    python benchmarks/start_ceiling.py --seeds 200 --data ../shared/data/utkface --aligned RUN/aligned
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from privacy_utility import DEMO_SITES, add_site_options, site_faces

from fahr_core.age.model import load_age_model
from fahr_core.age.predict import aligned_faces, predict_ages
from fahr_core.age.views import CENTRED
from fahr_core.cohort import load_cohort, split_patients
from fahr_core.cohort.simulate import SimulationParams, load_truth, simulate_sites
from fahr_core.config import SiteConfig
from fahr_core.io import atomic_write_json
from fahr_core.models import shipped
from fahr_core.survival.metrics import harrell_c

SCORES = (
    "oracle",
    "true age",
    "predicted age (forward pass)",
    "predicted age (face and mirror)",
    "predicted age (ten views)",
    "predicted age + sex",
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--age-model", type=Path, default=shipped.AGE_MODEL)
    ap.add_argument("--seeds", type=int, default=200, help="seeds 0..N-1")
    ap.add_argument("--out", type=Path, default=None, help="per-seed C of every score as JSON")
    ap.add_argument("--threads", type=int, default=1)
    add_site_options(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_age_model(a.age_model)
    work = Path(tempfile.mkdtemp(prefix="fahr-start-ceiling-"))
    aligned = a.aligned or work / "aligned"
    faces = site_faces(a.data, work, aligned, model.img_size)
    table, images = aligned_faces([f.path for f in faces], aligned, model.img_size, workers=1)
    # the simulator copies the bundled files, so a site photo's bytes name its face
    names = [_digest(Path(r.path)) for r in table.aligned]
    forward = dict(zip(names, predict_ages(model, images, shifts=CENTRED, mirror=False), strict=True))
    mirrored = dict(zip(names, predict_ages(model, images, shifts=CENTRED), strict=True))
    views = dict(zip(names, predict_ages(model, images), strict=True))
    params = SimulationParams(site_sizes=tuple(int(n) for n in a.sizes.split(",")))
    split = SiteConfig(name="", data=Path(), workdir=Path())  # the sites' default split
    per_seed: dict[str, list[float]] = {s: [] for s in SCORES}
    started = time.perf_counter()
    for seed in range(a.seeds):
        sites = simulate_sites(faces, work / f"sites-{seed}", params, seed, list(DEMO_SITES))
        c: dict[str, list[float]] = {s: [] for s in SCORES}
        for site in sites:
            truth = load_truth(site)
            _, test = split_patients(load_cohort(site), split.test_fraction, split.split_seed)
            held = [(p, _digest(p.photos[0])) for p in test.patients]
            held = [(p, d) for p, d in held if d in forward]  # faces that passed QC
            t = np.array([p.time for p, _ in held])
            e = np.array([p.event for p, _ in held])
            pred = np.array([views[d] for _, d in held])
            male = np.array([p.sex == "M" for p, _ in held], dtype=float)
            scores = {
                "oracle": np.array([truth[p.patient_id] for p, _ in held]),
                "true age": np.array([p.age for p, _ in held]),
                "predicted age (forward pass)": np.array([forward[d] for _, d in held]),
                "predicted age (face and mirror)": np.array([mirrored[d] for _, d in held]),
                "predicted age (ten views)": pred,
                "predicted age + sex": params.gompertz_shape * pred + params.sex_log_hr * male,
            }
            for s in SCORES:
                c[s].append(harrell_c(t, e, scores[s]))
        for s in SCORES:
            per_seed[s].append(float(np.nanmean(c[s])))
        shutil.rmtree(work / f"sites-{seed}")
    shutil.rmtree(work)
    oracle = np.array(per_seed["oracle"])
    print(
        f"\n# start ceiling on the held-out patients of the demo's sites — {time.strftime('%Y-%m-%d')}, "
        f"{platform.node()}, age model {a.age_model}, faces {a.data or 'bundled'}, sites of {a.sizes}, "
        f"seeds 0-{a.seeds - 1}, "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print("| risk score | mean held-out C (SD over seeds) | gap to oracle (SD over seeds) |")
    print("|---|---|---|")
    for s in SCORES:
        v = np.array(per_seed[s])
        gap = oracle - v
        print(f"| {s} | {v.mean():.3f} ({v.std(ddof=1):.3f}) | {gap.mean():.3f} ({gap.std(ddof=1):.3f}) |")
    if a.out:
        atomic_write_json(a.out, {"age_model": str(a.age_model), "per_seed": per_seed})


if __name__ == "__main__":
    main()
