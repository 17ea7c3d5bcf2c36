"""Fine-tuning modes compared: bytes each site sends per round, wall time per round, held-out C-index.

Semi-synthetic sites (real faces, Gompertz survival on age and sex; `fahr cohort simulate`) run a
federation in this process without Flower: each round every site trains from the global tensors
through `SiteRuntime.train_round` (DP-SGD, exactly as a site does), or, for the no-DP arm, with
plain training from the same tensors; the server averages the returned tensors weighted by
patients. Every mode gets the same sites, rounds, budget and seeds (a seed draws the cohorts and
the splits). The warm-start encoder is the demo's vit_micro MAE encoder, the foundation model here.

Held-out C-index: the final global model (LoRA merged) scores every site's held-out patients,
pooled; its 95% CI is a bootstrap over patients. Bytes: what one site sends per round (trainable
tensors in the wire dtype); the server's first message also carries the frozen base once.

    python benchmarks/finetune_modes.py --sites 2 --patients 100 --rounds 2 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import ModelConfig, PrivacyConfig, SiteConfig, TrainConfig
from fahr_core.models import shipped
from fahr_core.models.checkpoint import load_encoder_weights
from fahr_core.models.finetune import GlobalModel, merge, prepare, site_model, split_state, to_wire
from fahr_core.models.vit import SurvivalViT
from fahr_core.protocol import keys
from fahr_core.survival.metrics import bootstrap_ci, harrell_c
from fahr_core.train.local import patient_risk, train_nonprivate
from fahr_core.workdir import SITE_WORKDIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"
MODES = ("full", "last:1", "head", "lora", "ffa-lora")


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total for k in states[0]}


def run(spec: ModelConfig, sites: list[SiteRuntime], rounds: int, dp: bool) -> dict:
    """One federation; returns bytes per site-round, seconds per round, the pooled held-out C (CI)."""
    torch.manual_seed(0)
    model = SurvivalViT(spec.arch, spec.img_size, spec.n_intervals)
    load_encoder_weights(model.encoder, shipped.AGE_ENCODER)
    gm, trainable = GlobalModel.start(prepare(model, spec), spec)
    for site in sites:  # a fresh federation: no spend, no kept base
        site.cfg.paths.ledger.unlink(missing_ok=True)
        site.cfg.paths.frozen_base.unlink(missing_ok=True)
    sent_bytes, seconds = [], []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        sent = gm.outgoing(trainable, with_base=r == 1)
        states, sizes = [], []
        for site in sites:
            if dp:
                state, metrics = site.train_round(sent, gm.spec, r, rounds)
                n = int(metrics[keys.NUM_EXAMPLES])
            else:
                split = site.load(spec.img_size)
                local = site_model(sent, gm.spec, site.cfg.paths.frozen_base)
                train_nonprivate(local, split.train, site.cfg.train, spec.horizon_years, seed=r)
                state, n = split_state(local)[0], len(split.train)
            states.append(state)
            sizes.append(n)
            sent_bytes.append(sum(v.nbytes for v in to_wire(state, spec.wire_dtype).values()))
        trainable = fedavg(states, sizes)
        seconds.append(time.perf_counter() - started)
    final = merge(
        site_model(gm.outgoing(trainable, with_base=False), gm.spec, sites[0].cfg.paths.frozen_base)
    )
    t, e, risk = [], [], []
    for site in sites:
        test = site.load(spec.img_size).test
        t.append(test.time)
        e.append(test.event)
        risk.append(patient_risk(final, test))
    t, e, risk = np.concatenate(t), np.concatenate(e), np.concatenate(risk)
    lo, hi = bootstrap_ci(t, e, risk, n_boot=300)
    return {
        "bytes": statistics.mean(sent_bytes),
        "seconds": statistics.mean(seconds),
        "c": harrell_c(t, e, risk),
        "ci": (lo, hi),
        "held_out": (len(t), int(e.sum())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--patients", type=int, default=100, help="per site")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--wire-dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    began = time.perf_counter()
    load_before = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    faces_dir = SHARED if (SHARED / "labels.csv").exists() else demo_faces_dir()
    faces = load_labelled_faces(faces_dir)
    if faces_dir == SHARED:  # the warm-start encoder never saw the demo faces: keep it that way here
        demo = {p.name for p in (demo_faces_dir() / "images").iterdir()}
        faces = [f for f in faces if f.path.name not in demo]
    work = Path(tempfile.mkdtemp(prefix="fahr-finetune-modes-"))
    train = TrainConfig(local_epochs=a.epochs, batch_size=16, lr=2e-3, threads=a.threads)
    results: dict[tuple[str, bool], list[dict]] = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        params = SimulationParams(
            n_sites=a.sites,
            site_sizes=(a.patients,) * a.sites,
            site_mean_ages=(45.0, 60.0, 70.0)[: a.sites],
            site_baseline_rates=(0.03, 0.04, 0.02)[: a.sites],
        )
        names = [f"site{i + 1}" for i in range(a.sites)]
        dirs = simulate_sites(faces, work / f"seed{seed}", params, seed=seed, site_names=names)
        sites = [
            SiteRuntime(
                SiteConfig(
                    name=name,
                    data=d,
                    workdir=d / SITE_WORKDIR,
                    split_seed=seed,
                    privacy=PrivacyConfig(epsilon=a.epsilon),
                    train=train,
                )
            )
            for name, d in zip(names, dirs, strict=True)
        ]
        for mode in a.modes.split(","):
            spec = replace(ModelConfig(arch=shipped.ARCH), finetune=mode, wire_dtype=a.wire_dtype)
            for dp in (True, False):
                results.setdefault((mode, dp), []).append(run(spec, sites, a.rounds, dp))
                r = results[(mode, dp)][-1]
                print(
                    f"seed {seed} {mode} dp={dp}: C {r['c']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}), "
                    f"{r['bytes'] / 1e3:.1f} kB, {r['seconds']:.1f} s per round",
                    flush=True,
                )
    n, d = results[(a.modes.split(",")[0], True)][0]["held_out"]
    print(
        f"\n# fine-tuning modes — {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
        f"{a.threads} torch threads; faces from {faces_dir.name}; {a.sites} sites x {a.patients} patients "
        f"(held out, pooled: {n} patients, {d} deaths, seed {a.seeds.split(',')[0]}); vit_micro warm start; "
        f"{a.rounds} rounds x {a.epochs} epoch(s), batch 16, lr 2e-3; DP: epsilon {a.epsilon} per site; "
        f"wire {a.wire_dtype}; seeds {a.seeds}; load average before {load_before}; "
        f"took {(time.perf_counter() - began) / 60:.1f} min\n"
    )
    print(
        "| mode | DP | kB sent per site per round | vs full | s per round | held-out C, mean over seeds "
        "(min-max) | per-seed 95% CI (seed 1st) | C minus full's, mean (min-max) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (mode, dp), rows in results.items():
        full = results.get(("full", dp), rows)
        kb = statistics.mean(r["bytes"] for r in rows) / 1e3
        ratio = statistics.mean(r["bytes"] for r in full) / 1e3 / kb
        cs = [r["c"] for r in rows]
        diff = [r["c"] - f["c"] for r, f in zip(rows, full, strict=True)]
        lo, hi = rows[0]["ci"]
        print(
            f"| {mode} | {'yes' if dp else 'no'} | {kb:.1f} | 1/{ratio:.0f} | "
            f"{statistics.mean(r['seconds'] for r in rows):.1f} | {statistics.mean(cs):.3f} "
            f"({min(cs):.3f}-{max(cs):.3f}) | {lo:.3f}-{hi:.3f} | {statistics.mean(diff):+.3f} "
            f"({min(diff):+.3f} to {max(diff):+.3f}) |"
        )


if __name__ == "__main__":
    main()
