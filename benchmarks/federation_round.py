"""Where a federation round's time goes: the sites' part vs everything else, and bytes per site.

Runs a real local federation (SuperLink + one SuperNode per site on 127.0.0.1, as `fahr demo`
does) and splits each round, per site, into
  - at the site: from the round's start (the previous round's commit) to the moment the site's
    audit log recorded its reply (ClientApp start-up, data, DP-SGD, weight copies),
  - after the slowest site: the round's wall time minus the slowest site's part (scheduling,
    serialisation, transport, aggregation, checkpointing),
and reports the bytes of weights each site sends. Sites do not send their timings (how long a site
took depends on its data: fahr_core.protocol.outbound), so the site part is read from each site's
own audit log, which this benchmark can open because every site runs on this machine. The split of
the site's part (start-up, DP training) is in each site's own log. Prints a Markdown table for
docs/performance.md.

    python benchmarks/federation_round.py --arch vit_micro --rounds 3 --sites 3
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import PrivacyConfig, SiteConfig, TrainConfig, dump_site_config, load_site_config
from fahr_core.io import atomic_write_text
from fahr_core.protocol import keys
from fahr_core.workdir import SITE_WORKDIR, ServerWorkdir
from fahr_research.local import run_local_federation


def import_seconds(module: str, repeats: int = 3) -> float:
    """Best-of-N wall time of a fresh interpreter importing `module` (what each message pays)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_micro")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=100, help="patients per site")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--port", type=int, default=8600)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fahr-bench-"))
    names = [f"site{i + 1}" for i in range(a.sites)]
    params = SimulationParams(
        n_sites=a.sites,
        site_sizes=(a.patients,) * a.sites,
        site_mean_ages=(55.0,) * a.sites,
        site_baseline_rates=(0.03,) * a.sites,
    )
    simulate_sites(load_labelled_faces(demo_faces_dir()), work / "sites", params, seed=0, site_names=names)
    tomls = []
    for name in names:
        toml = work / "sites" / name / "site.toml"
        dump_site_config(
            SiteConfig(
                name=name,
                data=Path("."),
                workdir=Path(SITE_WORKDIR),
                privacy=PrivacyConfig(epsilon=8.0),
                train=TrainConfig(local_epochs=a.epochs, batch_size=16, threads=1),
            ),
            toml,
        )
        tomls.append(toml)
    atomic_write_text(
        work / "server.toml",
        f"""[federation]
rounds = {a.rounds}
min_sites = {a.sites}
port = {a.port}
workdir = "server"

[model]
arch = "{a.arch}"
""",
    )
    started = time.time()
    code = run_local_federation(work / "server.toml", tomls, echo=lambda _line: None)
    if code:
        sys.exit(f"federation failed (exit {code}); logs under {work}")
    rounds = [json.loads(x) for x in ServerWorkdir(work / "server").rounds_log.read_text().splitlines()]

    machine = platform.processor() or platform.machine()
    print(
        f"# federation round benchmark — {time.strftime('%Y-%m-%d')}, {platform.node()}, {machine}, "
        f"arch {a.arch}, {a.sites} sites x {a.patients} patients, {a.epochs} local epoch(s)\n"
    )
    print(
        f"cold `import fahr_client.app` in a fresh interpreter: {import_seconds('fahr_client.app'):.2f} s "
        f"(torch alone {import_seconds('torch'):.2f} s, flwr.clientapp alone "
        f"{import_seconds('flwr.clientapp'):.2f} s)\n"
    )
    print("| round | wall s | site | at the site s | after the slowest site s | MB sent |")
    print("|---|---|---|---|---|---|")
    replied = {  # (site, round) -> when the site's audit log recorded its train reply
        (name, r["round"]): r["time"]
        for name, toml in zip(names, tomls, strict=True)
        for r in map(json.loads, load_site_config(toml).paths.audit.read_text().splitlines())
        if r["kind"] == "train"
    }
    previous = started
    for r in rounds:
        wall = r["finished_at"] - previous
        at_site = {site: replied[site, r["round"]] - previous for site in r["sites"]}
        previous = r["finished_at"]
        for site, m in sorted(r["sites"].items()):
            cells = [
                r["round"],
                f"{wall:.1f}",
                site,
                f"{at_site[site]:.1f}",
                f"{wall - max(at_site.values()):.1f}",
                f"{m[keys.BYTES_SENT] / 1e6:.2f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
    print("\nRound 1's wall time includes SuperLink start-up and waiting for the sites to connect.")


if __name__ == "__main__":
    main()
