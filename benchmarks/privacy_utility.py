"""The privacy-utility curve: held-out C-index (95% CI) against the site's epsilon budget.

One simulated cohort (real faces, Gompertz survival on age and sex) is split once into training
and held-out patients. For each budget the same model (the demo's warm-start vit_micro encoder)
is trained for the same rounds and epochs with DP-SGD through `SiteRuntime`, exactly as a site
would, and once without DP for reference. The oracle C-index is that of the simulator's true
linear predictor on the same held-out patients: the ceiling for any model of age and sex.

    python benchmarks/privacy_utility.py --patients 1200 --rounds 3 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import ModelConfig, PrivacyConfig, SiteConfig, TrainConfig
from fahr_core.models.checkpoint import load_encoder_weights
from fahr_core.models.finetune import GlobalModel, prepare
from fahr_core.models.vit import SurvivalViT
from fahr_core.survival.metrics import bootstrap_ci, harrell_c
from fahr_core.train.local import patient_risk, train_nonprivate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"
ENCODER = demo_faces_dir() / "encoder_vit_micro.safetensors"


def c_with_ci(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> str:
    lo, hi = bootstrap_ci(time_, event, risk, n_boot=300)
    return f"{harrell_c(time_, event, risk):.3f} ({lo:.3f}-{hi:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    faces_dir = SHARED if (SHARED / "labels.csv").exists() else demo_faces_dir()
    faces = load_labelled_faces(faces_dir)
    if faces_dir == SHARED:  # the warm-start encoder never saw the demo faces: keep it that way here
        demo = {p.name for p in (demo_faces_dir() / "images").iterdir()}
        faces = [f for f in faces if f.path.name not in demo]
    work = Path(tempfile.mkdtemp(prefix="fahr-privacy-utility-"))
    params = SimulationParams(
        n_sites=1,
        site_sizes=(a.patients,),
        site_mean_ages=(55.0,),
        site_baseline_rates=(0.03,),
        age_mix_sd=20.0,
    )
    [site_dir] = simulate_sites(faces, work, params, seed=1, site_names=["pooled"])
    spec = ModelConfig(arch="vit_micro", finetune="last:1")
    train_cfg = TrainConfig(local_epochs=a.epochs, batch_size=32, lr=2e-3, threads=a.threads)

    def fresh_model() -> SurvivalViT:
        torch.manual_seed(0)
        model = SurvivalViT(spec.arch, spec.img_size, spec.n_intervals)
        load_encoder_weights(model.encoder, ENCODER)
        return prepare(model, spec)

    rows = []
    truth = {
        r.split(",")[0]: float(r.split(",")[1]) for r in (site_dir / "truth.csv").read_text().splitlines()[1:]
    }
    for label in [*a.epsilons.split(","), "none"]:
        started = time.perf_counter()
        cfg = SiteConfig(
            name="pooled",
            data=site_dir,
            workdir=work / f"state-{label}",
            privacy=PrivacyConfig(epsilon=float(label) if label != "none" else 1.0),
            train=train_cfg,
        )
        site = SiteRuntime(cfg)
        split = site.load(spec.img_size)
        model = fresh_model()
        if label == "none":
            for r in range(a.rounds):
                train_nonprivate(model, split.train, train_cfg, spec.horizon_years, seed=r)
            eps = "none"
        else:
            global_model, state = GlobalModel.start(model, spec)
            for r in range(1, a.rounds + 1):
                sent = global_model.outgoing(state, with_base=r == 1)
                state, metrics = site.train_round(sent, global_model.spec, r, a.rounds)
            model.load_state_dict(global_model.full(state))
            eps = f"{metrics['epsilon']:.2f}"
        test = split.test
        risk = patient_risk(model, test)
        rows.append((label, eps, c_with_ci(test.time, test.event, risk), time.perf_counter() - started))
    oracle = np.array([truth[p.patient_id] for p in split.test_cohort.patients])
    print(
        f"# privacy-utility — {time.strftime('%Y-%m-%d')}, {platform.node()}, faces from {faces_dir.name}, "
        f"{a.patients} patients ({len(test.time)} held out, {int(test.event.sum())} deaths), vit_micro "
        f"warm start, {a.rounds} rounds x {a.epochs} epochs\n"
    )
    print(
        f"oracle C-index of the true linear predictor on the held-out patients: "
        f"{c_with_ci(test.time, test.event, oracle)}\n"
    )
    print("| budget epsilon | epsilon spent | held-out C-index (95% CI) | seconds |")
    print("|---|---|---|---|")
    for label, eps, c, secs in rows:
        print(f"| {label} | {eps} | {c} | {secs:.0f} |")
    (work / "result.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
