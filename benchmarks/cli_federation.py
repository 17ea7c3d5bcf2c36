"""Held-out C of whole federations run as an operator runs them, against the oracle.

`privacy_utility.py` runs the sites' own training code in one process; issue #13 is checked
through the real commands. This benchmark runs, per seed, what a coordinator following the guides
runs: three semi-synthetic sites (`fahr cohort simulate`'s sites, its `site.toml` with the
`[train]` and `[privacy]` defaults: epsilon 8, plus the TLS connection), `fahr-server run` from
the `[model]` table `fahr models shipped` prints, and one `fahr-client start` per site, each its
own process (`fahr_research.local.run_local_federation`, as `fahr demo`). It then reads each
site's held-out C from the site's own validation report (`summary.json`) and scores, on the same
held-out patients, the simulator's true linear predictor (the oracle) and the start before any
round. Sites are drawn from the bundled faces or, with `--data`, from the validation part of the
model build's fixed decade split without the demo's faces: faces the shipped models were never
trained on (the build's warm-start stage chose the start on sites drawn from them).

    python benchmarks/cli_federation.py --seeds 0,1,2 --data ../shared/data/utkface --sizes 326,280,228
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

from fahr_client.runtime import SiteRuntime
from fahr_core.age.split import decade_split
from fahr_core.cohort import FaceRecord, demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, load_truth, simulate_sites
from fahr_core.config import dump_site_config, load_site_config
from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.models import shipped
from fahr_core.models.initial import initial_model
from fahr_core.survival.metrics import harrell_c
from fahr_core.train.local import patient_risk
from fahr_ops.processes import free_local_port
from fahr_research.local import demo_server_toml, local_credentials, run_local_federation
from fahr_research.models import demo_face_names

SITES = ("north", "south", "west")


def unseen_faces(data: Path | None) -> list[FaceRecord]:
    """The bundled faces, or the validation part of `data`'s fixed decade split less the demo's
    faces (before alignment: a face the aligner rejects is the sites' own rejection to make)."""
    if data is None:
        return load_labelled_faces(demo_faces_dir())
    faces = load_labelled_faces(data)
    _, validation = decade_split([f.path.name for f in faces], [f.age for f in faces])
    demo = demo_face_names()
    return [faces[i] for i in validation if faces[i].path.name not in demo]


def federation(run: Path, faces: list[FaceRecord], sizes: tuple[int, ...], seed: int) -> dict:
    """One seed: simulate the sites, run the federation through the CLIs, score the held-out patients."""
    sites = simulate_sites(faces, run / "sites", SimulationParams(site_sizes=sizes), seed, list(SITES))
    port = free_local_port()
    security, connections = local_credentials(run / "certs", SITES, port)
    tomls = [d / "site.toml" for d in sites]
    for toml, name in zip(tomls, SITES, strict=True):
        dump_site_config(replace(load_site_config(toml), connection=connections[name]), toml)
    server_toml = run / "server.toml"  # the demo's: 3 rounds from the shipped start (`fahr models shipped`)
    atomic_write_text(server_toml, demo_server_toml(3, len(SITES), port, security))
    spec = shipped.start_spec()
    started = time.perf_counter()
    code = run_local_federation(server_toml, tomls, echo=lambda s: None)
    if code:
        raise SystemExit(f"seed {seed}: the federation failed (exit {code}); logs under {run}")
    row: dict = {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "sites": {}}
    start = initial_model(spec).eval()
    for toml in tomls:
        cfg = load_site_config(toml)
        report = json.loads(cfg.paths.report_summary.read_text())
        split = SiteRuntime(cfg).load(spec.img_size)
        truth = load_truth(cfg.data)
        t, e = split.test.time, split.test.event
        if report["n"] != len(t) or report["events"] != int(e.sum()) or report["c_index"] is None:
            raise SystemExit(
                f"seed {seed}, site {cfg.name}: its report scored {report['n']} held-out patients "
                f"({report['events']} deaths, C {report['c_index']}), not the {len(t)} ({int(e.sum())}) "
                f"scored here; see {cfg.paths.report_summary}"
            )
        row["sites"][cfg.name] = {
            "held_out_patients": len(t),
            "held_out_events": int(e.sum()),
            "epsilon_spent": report["privacy"]["epsilon"],
            "c": report["c_index"],
            "start_c": harrell_c(t, e, patient_risk(start, split.test)),
            "oracle_c": harrell_c(t, e, np.array([truth[p.patient_id] for p in split.test_cohort.patients])),
        }
    for key in ("c", "start_c", "oracle_c"):
        row[f"mean_{key}"] = float(np.mean([s[key] for s in row["sites"].values()]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=None, help="labelled faces: draw the sites from their validation part"
    )
    ap.add_argument("--sizes", default="150,120,90", help="patients per site")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every seed so far (default: not written)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (sites, server, logs)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    faces = unseen_faces(a.data)
    sizes = tuple(int(n) for n in a.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="fahr-cli-federation-"))
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):  # a failed seed exits, its folder kept for the logs
        rows.append(federation(work / f"seed-{seed}", faces, sizes, seed))
        shown = ("seed", "mean_start_c", "mean_c", "mean_oracle_c", "seconds")
        print(json.dumps({k: rows[-1][k] for k in shown}), flush=True)
        if a.out:  # after every seed: a later seed's failure keeps the earlier ones
            atomic_write_json(a.out, {"faces": str(a.data or "bundled"), "sizes": sizes, "rows": rows})
    if not a.keep:
        shutil.rmtree(work)
    gap = np.array([r["mean_oracle_c"] - r["mean_c"] for r in rows])
    change = np.array([r["mean_c"] - r["mean_start_c"] for r in rows])
    se = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    mean = {key: np.mean([r[f"mean_{key}"] for r in rows]) for key in ("c", "start_c", "oracle_c")}
    print(
        f"\n# fahr-server run + fahr-client start, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"faces {a.data or 'bundled'} ({len(faces)}), sites of {a.sizes}, seeds {a.seeds}\n"
        f"mean held-out C {mean['c']:.3f}, start {mean['start_c']:.3f}, oracle {mean['oracle_c']:.3f}; "
        f"gap to oracle {gap.mean():.3f} (SE {se:.3f}); change from the start {change.mean():+.3f} "
        f"({change.min():+.3f} to {change.max():+.3f})"
    )


if __name__ == "__main__":
    main()
