"""Helpers that several test modules share: simulated sites, ports and processes, the three CLIs,
synthetic survival cohorts, report pages and strategy messages. Test modules import them from here
(never from each other or from conftest, which holds only fixtures), so any one test file can move,
be renamed or be run alone."""

from __future__ import annotations

import ast
import base64
import os
import re
import signal
import socket
from pathlib import Path

import click
import numpy as np
import torch
import typer
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Metadata
from flwr.serverapp.strategy import FedAvg

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import (
    AlignmentConfig,
    ConnectionConfig,
    PrivacyConfig,
    SiteConfig,
    TrainConfig,
    dump_site_config,
)
from fahr_core.report.site import write_site_report
from fahr_core.report.summary import PatientScores, SiteContext
from fahr_core.workdir import SITE_WORKDIR
from fahr_server.state import FederationState
from fahr_server.strategy import FahrFedAvg

# ../shared/data beside the checkout; FAHR_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("FAHR_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def utkface_faces() -> Path:
    """The full labelled UTKFace copy in ../shared when present, else the faces bundled with fahr:
    enough for the small simulated sites the federation tests build, so those never skip."""
    folder = SHARED / "utkface"
    return folder if (folder / "labels.csv").exists() else demo_faces_dir()


# --- simulated sites, ports and the processes a test starts -----------------------------------------


def make_sites(
    out: Path,
    faces_dir: Path,
    sizes: tuple[int, ...],
    epsilon: float = 8.0,
    seed: int = 0,
    connections: dict[str, ConnectionConfig] | None = None,
) -> list[Path]:
    """Simulated sites (site1, site2, ...) with CPU-sized training; returns the site.toml paths."""
    n = len(sizes)
    params = SimulationParams(
        n_sites=n,
        site_sizes=sizes,
        site_mean_ages=(45.0, 60.0, 70.0)[:n],
        site_baseline_rates=(0.03, 0.04, 0.02)[:n],
    )
    names = [f"site{i + 1}" for i in range(n)]
    simulate_sites(load_labelled_faces(faces_dir), out, params, seed=seed, site_names=names)
    tomls = []
    for name in names:
        cfg = SiteConfig(
            name=name,
            data=Path("."),
            workdir=Path(SITE_WORKDIR),
            privacy=PrivacyConfig(epsilon=epsilon),
            train=TrainConfig(local_epochs=1, batch_size=16, lr=1e-3, threads=1),
            connection=(connections or {}).get(name, ConnectionConfig()),
            alignment=AlignmentConfig(workers=1),
        )
        dump_site_config(cfg, out / name / "site.toml")
        tomls.append(out / name / "site.toml")
    return tomls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_processes() -> dict[int, tuple[str, int]]:
    """pid -> (command line, process group) of every live, non-zombie process (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            found[int(pid)] = (cmd, int(stat[2]))
    return found


def flower_processes_under(folder: Path | str) -> list[str]:
    """Command lines of live processes that mention `folder` (ours carry it in their arguments)."""
    return [cmd for cmd, _ in live_processes().values() if str(folder) in cmd]


def process_groups_under(*marks: Path | str) -> set[int]:
    """Process groups of the live processes whose command line mentions any of `marks`."""
    return {pgid for cmd, pgid in live_processes().values() if any(str(m) in cmd for m in marks)}


def crash_processes_under(*marks: Path | str) -> set[int]:
    """SIGKILL the whole process group of every process mentioning one of `marks`: a machine crash,
    as far as those processes can tell (no handler runs). Returns the groups."""
    groups = process_groups_under(*marks)
    for pgid in groups:
        os.killpg(pgid, signal.SIGKILL)
    return groups


def live_groups(groups: set[int]) -> list[str]:
    """Command lines of live processes still in `groups`."""
    return [cmd for cmd, pgid in live_processes().values() if pgid in groups]


# --- the three command-line programs ----------------------------------------------------------------


def cli_commands() -> list[tuple[str, tuple[str, ...], click.Command]]:
    """(program, argv prefix, command) for every command of the three CLIs, groups included."""
    from fahr_client.cli import app as client_app
    from fahr_research.cli import app as tools_app
    from fahr_server.cli import app as server_app

    def below(cmd: click.Command, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], click.Command]]:
        found = [(path, cmd)]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                found += below(sub, (*path, name))
        return found

    apps = {"fahr": tools_app, "fahr-server": server_app, "fahr-client": client_app}
    return [
        (prog, path, cmd)
        for prog, app in apps.items()
        for path, cmd in below(typer.main.get_command(app), ())
    ]


# --- synthetic survival cohorts whose truth is known -------------------------------------------------


def cohort(n: int, beta: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential event times with hazard exp(beta * risk), independent exponential censoring."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-beta * risk))
    t_censor = rng.exponential(2.0, size=n)
    return np.minimum(t_event, t_censor), (t_event <= t_censor).astype(int), risk


DEGENERATE = {
    "no_events": (np.linspace(0.1, 3, 30), np.zeros(30, int), np.linspace(-1, 1, 30)),
    "one_event": (np.linspace(0.1, 3, 30), np.r_[1, np.zeros(29, int)], np.linspace(-1, 1, 30)),
    "n5": (np.array([0.5, 1.0, 1.5, 2.0, 2.5]), np.array([1, 0, 1, 0, 1]), np.arange(5.0)),
    "all_tied_times": (np.ones(20), np.ones(20, int), np.linspace(-1, 1, 20)),
    "time_zero": (np.r_[np.zeros(5), np.linspace(0.1, 3, 25)], np.r_[[1, 0] * 15], np.linspace(-1, 1, 30)),
    "empty": (np.array([]), np.array([], int), np.array([])),
    "single": (np.array([1.0]), np.array([1]), np.array([0.0])),
}


def simulate(n: int = 1500, seed: int = 0, z_sd: float = 1.5) -> dict[str, np.ndarray]:
    """Cohort with hazard 0.1 * exp(0.7 z + 0.03 (age - 50) + 0.4 male), uniform censoring over 1-8 years.

    Also returns the true per-patient rate ``lam``, from which the correct S(t) = exp(-lam t) follows.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, z_sd, n)
    age = rng.uniform(30, 80, n)
    male = rng.integers(0, 2, n)
    lam = 0.1 * np.exp(0.7 * z + 0.03 * (age - 50) + 0.4 * male)
    t_event = rng.exponential(1 / lam)
    t_censor = rng.uniform(1, 8, n)
    time, event = np.minimum(t_event, t_censor), (t_event <= t_censor).astype(int)
    return {"time": time, "event": event, "risk": z, "age": age, "male": male, "lam": lam}


def true_surv(lam: np.ndarray, horizons: tuple[float, ...] = (1.0, 2.0, 5.0)) -> dict[float, np.ndarray]:
    return {h: np.exp(-lam * h) for h in horizons}


# --- report pages ------------------------------------------------------------------------------------

PRIVACY = {"epsilon": np.float64(2.5), "delta": 1e-5, "budget": 8.0, "noise_multiplier": 1.1}
META = {"model_version": "vit-s16@abc123", "data_version": "2024-06", "rounds": 5}
QC = {"photos": 300, "aligned": 296, "rejected": {"no face": 3, "blur": 1}}
IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def images(html: str) -> dict[str, bytes]:
    """{alt text: decoded PNG} of every inline image; asserts each is a real PNG inside a captioned figure."""
    found = {alt: base64.b64decode(data) for alt, data in IMG.findall(html)}
    assert html.count("<img") == len(found), "every <img> needs alt text and an inline PNG"
    assert html.count("<figure>") == html.count("<figcaption>") == len(found)
    assert all(png.startswith(PNG_MAGIC) for png in found.values()) and all(found)
    return found


def full_site_report(out: Path, n: int = 400, n_boot: int = 50) -> dict:
    """A site report with every optional input, on a cohort simulated with known age/sex/risk effects."""
    d = simulate(n=n, seed=31)
    scores = PatientScores(d["time"], d["event"], d["risk"], d["age"], d["male"], true_surv(d["lam"]))
    return write_site_report(
        out, scores, SiteContext("hospital-full", PRIVACY, META, qc=QC), n_boot=n_boot
    ).to_json()


# --- the server strategy, driven with messages as the ServerApp receives them -------------------------


def train_reply(node: int, site: str = "", weights: dict | None = None) -> Message:
    """A train reply as the ServerApp receives it: weights and metrics from the site, or an error
    the SuperLink wrote itself (from its own node id, 1) for the message it sent to `node`."""
    if weights is None:
        meta = Metadata(1, "", 1, 0, f"to-{node}", "1", 0.0, 600.0, "train")
        return Message(metadata=meta, error=Error(code=0, reason=f"node {node} is unavailable"))
    meta = Metadata(1, "", node, 0, f"to-{node}", "1", 0.0, 600.0, "train")
    content = {
        "arrays": ArrayRecord(weights),
        "metrics": MetricRecord({"num-examples": 10, "epsilon": 1.5}),
        "site": ConfigRecord({"name": site}),
    }
    return Message(metadata=meta, content=RecordDict(content))


def sent_round(strategy: FahrFedAvg, weights: dict, nodes: tuple[int, ...]) -> FahrFedAvg:
    """`strategy` as configure_train leaves it: `weights` sent to `nodes` in train messages with the
    ids the grid gave them when sending (what an error reply answers)."""
    sent = [
        Message(metadata=Metadata(1, f"to-{n}", 1, n, "", "1", 0.0, 600.0, "train"), content=RecordDict())
        for n in nodes
    ]
    strategy.remember_round(weights, sent)
    return strategy


def fahr_strategy(work: Path, last_round: int = 0, aggregator: FedAvg | None = None) -> FahrFedAvg:
    """A three-round, two-site FahrFedAvg in `work` that has sent zero weights to nodes 1, 2 and 3."""
    state = FederationState(last_round, 3, "", "", "test", {})
    strategy = FahrFedAvg(work, 3, 2, 1.0, {}, state, join_timeout_s=1, aggregator=aggregator)
    return sent_round(strategy, {"w": torch.zeros(4)}, (1, 2, 3))


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, nodes) and n.body and isinstance(n.body[0], ast.Expr)
    }


def spelled_keys(source: str, wanted: set[str]) -> list[tuple[int, str]]:
    """(line, key) for every string constant in `source`, other than a docstring, equal to a wanted key."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return sorted(
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in wanted and id(n) not in docs
    )
