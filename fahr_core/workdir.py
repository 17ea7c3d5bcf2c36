"""Where things live in a server's or a site's workdir: one class per side names every file.

The server CLI, the ServerApp, the run state for `--resume`, the operator's status view and the
local-federation launcher all read and write the same server workdir; the site CLI, the ClientApp,
its runtime, secure aggregation and `fahr-client status` the same site workdir. A file name spelled
in two of them could drift apart (a status view reading a file nobody writes any more), so each
asks these classes for a path and `tests/test_workdir_names.py` fails on a name spelled elsewhere.
Plain classes over a root folder: they create nothing, so a status command can use them read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPORT_PAGE = "report.html"  # a report folder's page, for people (fahr_core.report)
REPORT_SUMMARY = "summary.json"  # beside it, its numbers for programs (aggregates only)
SITE_WORKDIR = ".fahr"  # a site's workdir unless site.toml names one: inside the site's data folder


@dataclass(frozen=True)
class _Workdir:
    """What both sides keep under the same names."""

    root: Path

    @property
    def global_model(self) -> Path:
        """The global model as a plain SurvivalViT (LoRA merged): the server's latest, a site's evaluated."""
        return self.root / "global_model.safetensors"

    @property
    def report(self) -> Path:
        """The validation report: REPORT_SUMMARY and REPORT_PAGE (fahr_core.report)."""
        return self.root / "report"

    @property
    def report_page(self) -> Path:
        return self.report / REPORT_PAGE

    @property
    def report_summary(self) -> Path:
        return self.report / REPORT_SUMMARY

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the side's Flower processes (SuperLink and `flwr` CLI, or SuperNode)."""
        return self.root / "flwr-home"


@dataclass(frozen=True)
class ServerWorkdir(_Workdir):
    """A federation's workdir ([federation].workdir in the server config)."""

    @property
    def ready(self) -> Path:
        """Written once the SuperLink is up and the site keys are registered: sites may connect now."""
        return self.root / "superlink.ready"

    @property
    def run_summary(self) -> Path:
        """Written by the ServerApp after the federation report: the run finished."""
        return self.root / "run.json"

    @property
    def state(self) -> Path:
        """The last committed round, HMAC-signed: what `--resume` continues from (fahr_server.state)."""
        return self.root / "state.json"

    @property
    def rounds_log(self) -> Path:
        """One JSON line per aggregated round: each site's metrics, rejections, failures."""
        return self.root / "rounds.jsonl"

    @property
    def rejections_log(self) -> Path:
        """One JSON line per rejected update, with the reason."""
        return self.root / "rejections.jsonl"

    @property
    def events_log(self) -> Path:
        """The operator's events, followed by `fahr-server run` and read by `fahr-server status`."""
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        """Frozen base and trained tensors after a round, unmerged: what a resumed run loads."""
        return self.checkpoints / f"global_round_{server_round:03d}.safetensors"

    @property
    def run_records(self) -> tuple[Path, ...]:
        """What a federation leaves behind; a fresh run refuses to mix its results with these."""
        return (self.state, self.rounds_log, self.rejections_log, self.checkpoints, self.global_model)

    def set_aside(self, stamp: str) -> Path:
        """The folder a fresh run moves an uncommitted earlier attempt's records into."""
        return self.root / f"uncommitted-{stamp}"

    @property
    def run_log(self) -> Path:
        """Flower's own log of the run (`flwr run --stream`)."""
        return self.root / "run.log"

    @property
    def superlink_log(self) -> Path:
        return self.root / "superlink.log"

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def registered_sites(self) -> Path:
        """Site public key digest -> {key file, SuperNode id}, so a removed key can be unregistered."""
        return self.root / "registered_sites.json"

    @property
    def app(self) -> Path:
        """The generated one-file Flower App that `flwr run` submits."""
        return self.root / "app"


@dataclass(frozen=True)
class SiteWorkdir(_Workdir):
    """A site's workdir ([site].workdir in site.toml): its privacy state, caches and reports."""

    @property
    def ledger(self) -> Path:
        """The privacy ledger: every DP-SGD step the site ever took (fahr_core.privacy.ledger)."""
        return self.root / "privacy_ledger.json"

    @property
    def audit(self) -> Path:
        """The hash-chained log of everything the site sent (fahr_core.privacy.audit)."""
        return self.root / "outbound_audit.jsonl"

    @property
    def last_evaluation(self) -> Path:
        """The last evaluation's round, run and privacy figures, for `fahr-client status`."""
        return self.root / "last_evaluation.json"

    @property
    def aligned(self) -> Path:
        """The alignment cache: results and aligned faces, keyed by photo content and settings."""
        return self.root / "aligned"

    @property
    def face_cache(self) -> Path:
        """Decoded model inputs, so a round does not decode every aligned face again."""
        return self.root / "cache"

    @property
    def frozen_base(self) -> Path:
        """The federation's frozen base, as received once (fahr_core.models.finetune)."""
        return self.root / "frozen_base.safetensors"

    @property
    def age_model(self) -> Path:
        """The federation's age model, as received for the face-age deviation analysis."""
        return self.root / "age_model.safetensors"

    @property
    def secagg_update(self) -> Path:
        """This round's update while secure aggregation masks it; deleted once masked."""
        return self.root / "secagg_update.npy"

    @property
    def supernode_log(self) -> Path:
        return self.root / "supernode.log"
