"""Held-out C of a short federation over simulated sites, run in one process, against the oracle.

Which encoder the survival model should start from, and what DP costs, are questions about what a
federation ends with on patients it never trained on. Starting a SuperLink and one ClientApp per
site per round (docs/performance.md) costs more than the training itself for a vit_micro, so this
runs the same per-site code (`SiteRuntime.train_round`: alignment, split, DP-SGD, ledger) and the
same example-weighted FedAvg as the server, in process. The reference is the simulator's true
linear predictor (`truth.csv`), scored on the same held-out patients: the best any model of the
face can do.

The DP noise and Poisson sampling stay on the secure source `train_dp` uses; only the cohort (the
simulation seed) and the model's initial head are seeded, so repeated arms differ by the seed of
their cohort, as the privacy-utility curve wants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fahr_client.runtime import SiteRuntime
from fahr_core.cohort.simulate import load_truth
from fahr_core.config import ModelConfig, PrivacyConfig, SiteConfig, TrainConfig
from fahr_core.faces.pipeline import ALIGNED_DIR, RESULTS_DIR
from fahr_core.models.finetune import GlobalModel, build, from_wire, prepare
from fahr_core.models.initial import initial_model
from fahr_core.models.vit import SurvivalViT
from fahr_core.protocol import keys
from fahr_core.survival.metrics import harrell_c
from fahr_core.train.local import patient_risk, train_nonprivate
from fahr_core.workdir import SiteWorkdir

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FederationSetup:
    """The demo's federation (`fahr demo`): 3 rounds, epsilon 8, 3 local epochs (the spec's `finetune`
    says what trains: the demo's is `fahr_core.models.shipped.FINETUNE`, the head and the last block).

    lr 2e-3: on the demo's sites (13 seeds) it leaves the age-model start's mean held-out C where
    it was, as 5e-4 does, but on the model build's sites from the validation faces it added 0.02
    and 0.08 where 5e-4 added nothing (docs/performance.md#privacy-utility-curve). On larger
    sites (228-326 patients) from those faces it keeps the start (-0.000, SE 0.004, 12 seeds) now
    that the risk bias learns at TrainConfig.level_lr (with it at 2e-3: -0.019); 5e-4 keeps it
    closer still but learns less where a cohort holds more than age
    (docs/performance.md#the-sites-hazard-level)."""

    rounds: int = 3
    privacy: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(epsilon=8.0, max_grad_norm=1.0))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(local_epochs=3, batch_size=16, lr=2e-3, threads=1)
    )
    private: bool = True  # False: the same rounds without clipping or noise (the curve's reference arm)


def initial_state(spec: ModelConfig, seed: int = 0) -> tuple[GlobalModel, State]:
    """What the server starts from (`fahr_core.models.initial.initial_model`: `spec`'s encoder
    checkpoint or age model), prepared for `spec.finetune` and split into the global model (spec
    with the base's hash, frozen base) and the trainable tensors that travel."""
    return GlobalModel.start(prepare(initial_model(spec, seed), spec), spec)


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Example-weighted mean of the sites' weights (FedAvg, as the server's strategy aggregates)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return {
        k: sum(float(wi) * s[k].double() for wi, s in zip(w, states, strict=True)).to(states[0][k].dtype)
        for k in states[0]
    }


def federate(
    site_dirs: Sequence[Path],
    spec: ModelConfig,
    setup: FederationSetup,
    workdir: Path,
    echo: Callable[[str], object] = print,
    alignment_cache: Path | None = None,
) -> dict[str, Any]:
    """Train `setup.rounds` rounds over the sites from `spec`'s initial model (its `encoder_checkpoint`
    or `init_age_model`, as a server's); per-site held-out C and oracle C.

    `workdir/<site>` holds each site's state (ledger, alignment cache); it must be fresh, since a
    site's ledger would otherwise still hold an earlier run's spend. `alignment_cache`: an
    `align_photos` folder the sites' photos were already aligned in (the simulator copies faces,
    and the cache is keyed by content and settings), shared instead of aligning every photo again.
    """
    sites = []
    for d in site_dirs:
        if alignment_cache is not None:
            own = SiteWorkdir(Path(workdir) / Path(d).name).aligned
            own.mkdir(parents=True, exist_ok=True)
            for sub in (RESULTS_DIR, ALIGNED_DIR):
                (own / sub).symlink_to(Path(alignment_cache).resolve() / sub, target_is_directory=True)
        cfg = SiteConfig(
            name=Path(d).name,
            data=Path(d),
            workdir=Path(workdir) / Path(d).name,
            privacy=setup.privacy,
            train=setup.train,
        )
        sites.append(SiteRuntime(cfg))
    global_model, state = initial_state(spec)
    for r in range(1, setup.rounds + 1):
        states, sizes = [], []
        sent = global_model.outgoing(state, with_base=r == 1)  # as the server sends it
        for site in sites:
            if setup.private:
                new, metrics = site.train_round(sent, global_model.spec, r, setup.rounds)
                n = metrics[keys.NUM_EXAMPLES]
            else:
                split = site.load(spec.img_size)
                model = build(spec)
                model.load_state_dict(global_model.full(from_wire(sent, spec.wire_dtype)))
                train_nonprivate(model, split.train, setup.train, spec.horizon_years, seed=r)
                new = {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}
                n = len(split.train)
            states.append(new)
            sizes.append(n)
        state = fedavg(states, sizes)
        echo(f"round {r}/{setup.rounds}: {len(sites)} sites aggregated")
    model = SurvivalViT(spec.arch, spec.img_size, spec.n_intervals)
    model.load_state_dict(global_model.plain(state))
    per_site = {}
    for site in sites:
        split = site.load(spec.img_size)
        truth = load_truth(site.cfg.data)
        oracle = np.array([truth[p.patient_id] for p in split.test_cohort.patients])
        t, e = split.test.time, split.test.event
        per_site[site.cfg.name] = {
            "held_out_patients": len(t),
            "held_out_events": int(e.sum()),
            "c": harrell_c(t, e, patient_risk(model, split.test)),
            "oracle_c": harrell_c(t, e, oracle),
        }
    return {
        "sites": per_site,
        "mean_c": float(np.mean([s["c"] for s in per_site.values()])),
        "mean_oracle_c": float(np.mean([s["oracle_c"] for s in per_site.values()])),
    }


def non_private(setup: FederationSetup) -> FederationSetup:
    """The same federation without DP: the privacy-utility curve's reference arm."""
    return replace(setup, private=False)
