"""The privacy-utility curve on simulated sites: mean held-out C against the sites' epsilon budget.

For each seed, the demo's three sites are simulated from the bundled faces (`fahr demo`'s sizes,
age mixes and rates; the seed draws the faces and the outcomes) or, with `--data`, from the
validation part of the model build's fixed split (faces the age model never saw, as the build's
warm-start stage draws its sites; `--sizes` for larger sites), and the demo's federation
(3 rounds, head + last block, 3 local epochs, batch 16, lr 2e-3) is run in process
(`fahr_client.simulation.federate`: each site's own `SiteRuntime.train_round`, DP-SGD
charged to its ledger, example-weighted FedAvg) from the demo's start (the age model as
`init_age_model`, or `--encoder` with a zero risk head), once per budget and once without DP;
the `untrained` arm scores the start itself. The options change one setting at a time (what
trains, lr, epochs, rounds), for the comparisons in docs/performance.md. The reference is the
oracle C of the simulator's true linear predictor on the same held-out patients. Within a seed
every arm sees the same cohort (a paired comparison); DP noise is drawn fresh per arm from the
secure source.

    python benchmarks/privacy_utility.py --epsilons 1,3,8 --seeds 0,1,2 --out RUN/privacy_utility.json
    python benchmarks/privacy_utility.py --epsilons 8 --seeds 0,1,2 --data ../shared/data/utkface \
        --aligned BUILD/aligned --sizes 326,280,228
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fahr_client.simulation import FederationSetup, federate
from fahr_core.cohort import FaceRecord, demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import ModelConfig
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.pipeline import align_photos
from fahr_core.io import atomic_write_json
from fahr_core.models import shipped
from fahr_research.models import ModelBuild, Recipe

DEMO_SITES = ("maastro", "boston", "leiden")  # fahr demo's sites and sizes
DEMO_SIZES = (150, 120, 90)


def add_site_options(ap: argparse.ArgumentParser) -> None:
    """The options that say which faces the simulated sites are drawn from, and how many."""
    ap.add_argument(
        "--data", type=Path, default=None, help="labelled faces: draw the sites from their validation part"
    )
    ap.add_argument("--aligned", type=Path, default=None, help="alignment cache (e.g. a model build's)")
    ap.add_argument("--sizes", default=",".join(map(str, DEMO_SIZES)), help="patients per site")


def site_faces(data: Path | None, work: Path, aligned: Path, img_size: int) -> list[FaceRecord]:
    """The bundled faces, or the validation part of `data` under the model build's fixed split
    without the demo's faces: the faces the shipped age model was never trained or selected on."""
    if data is None:
        return load_labelled_faces(demo_faces_dir())
    build = ModelBuild(data, work / "build", Recipe(img_size=img_size), aligned, echo=lambda s: None)
    return [f for f in build.part("validation")[0] if f.path.name not in build.exclude]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--age-model", type=Path, default=shipped.AGE_MODEL)
    ap.add_argument(
        "--encoder", type=Path, default=None, help="start from this encoder and a zero risk head instead"
    )
    ap.add_argument(
        "--finetune", default=shipped.FINETUNE, help=f"what the sites train (the demo's: {shipped.FINETUNE})"
    )
    ap.add_argument("--lr", type=float, default=None, help="local lr (default: the demo's)")
    ap.add_argument("--local-epochs", type=int, default=None, help="local epochs (default: the demo's)")
    ap.add_argument("--batch", type=int, default=None, help="expected batch size (default: the demo's)")
    ap.add_argument("--level-lr", type=float, default=None, help="the risk bias's lr (default: the demo's)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the demo's)")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every arm (default: not written)")
    ap.add_argument("--threads", type=int, default=1)
    add_site_options(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="fahr-privacy-utility-"))
    aligned = a.aligned or work / "aligned"
    start = {"encoder_checkpoint": str(a.encoder)} if a.encoder else {"init_age_model": str(a.age_model)}
    spec = ModelConfig(arch=shipped.ARCH, finetune=a.finetune, **start)
    faces = site_faces(a.data, work, aligned, spec.img_size)
    sizes = tuple(int(n) for n in a.sizes.split(","))
    demo = FederationSetup()
    train = replace(
        demo.train,
        lr=a.lr or demo.train.lr,
        local_epochs=a.local_epochs or demo.train.local_epochs,
        batch_size=a.batch or demo.train.batch_size,
        level_lr=a.level_lr or demo.train.level_lr,
    )
    base = replace(demo, train=train, rounds=a.rounds or demo.rounds)
    arms = [("untrained", replace(base, rounds=0))]  # the initial model itself: what training adds to it
    arms += [
        (eps, replace(base, privacy=replace(base.privacy, epsilon=float(eps))))
        for eps in a.epsilons.split(",")
    ]
    arms.append(("none", replace(base, private=False)))
    # every site photo is a copy of one of the faces: align those once, and let the sites share the cache
    align_photos([f.path for f in faces], aligned, BlazeFaceDetector(), workers=1)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        sites = simulate_sites(
            faces, work / f"sites-{seed}", SimulationParams(site_sizes=sizes), seed, list(DEMO_SITES)
        )
        for label, setup in arms:
            started = time.perf_counter()
            state = work / f"state-{seed}-{label}"
            shutil.rmtree(state, ignore_errors=True)
            res = federate(sites, spec, setup, state, lambda s: None, aligned)
            rows.append(
                {"seed": seed, "epsilon": label, **res, "seconds": round(time.perf_counter() - started, 1)}
            )
            print(
                json.dumps(
                    {k: rows[-1][k] for k in ("seed", "epsilon", "mean_c", "mean_oracle_c", "seconds")}
                ),
                flush=True,
            )
    print(
        f"\n# privacy-utility on the demo's federation — {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"faces {a.data or 'bundled'}, sites of {a.sizes}, "
        f"start {a.encoder or a.age_model}, finetune {a.finetune}, {base.rounds} rounds x "
        f"{base.train.local_epochs} epochs at lr {base.train.lr:g} (level {base.train.level_lr:g}), "
        f"batch {base.train.batch_size}, "
        f"seeds {a.seeds}\n"
    )
    print("| budget epsilon | mean held-out C (mean over seeds, SD) | mean oracle C | gap to oracle |")
    print("|---|---|---|---|")
    for label, _ in arms:
        c = np.array([r["mean_c"] for r in rows if r["epsilon"] == label])
        o = np.array([r["mean_oracle_c"] for r in rows if r["epsilon"] == label])
        sd = c.std(ddof=1) if len(c) > 1 else 0.0
        print(f"| {label} | {c.mean():.3f} ({sd:.3f}) | {o.mean():.3f} | {o.mean() - c.mean():.3f} |")
    if a.out:
        atomic_write_json(
            a.out,
            {
                "start": str(a.encoder or a.age_model),
                "faces": str(a.data or "bundled"),
                "sizes": sizes,
                "setup": repr(base),
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
