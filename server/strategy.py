"""FedAvg weighted by site examples, plus what the federation must keep: a checkpoint of the
global weights after every round, a per-round log of the sites' aggregate metrics, and the
sites' final evaluation summaries for the global report.

Sites evaluate only after the last round: every Flower message costs a fresh ClientApp process
(seconds of imports), and a per-round evaluation would double that for numbers nobody reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fahr_core.models.checkpoint import save_weights
from fahr_core.models.finetune import GlobalModel, from_wire
from fahr_core.privacy.ledger import encode_spend_on_record
from fahr_core.protocol import keys
from fahr_core.workdir import ServerWorkdir
from fahr_server.events import emit, emit_round
from fahr_server.screening import screen_updates
from fahr_server.secagg import SecureSum
from fahr_server.state import FederationState, file_sha256, write_state

log = logging.getLogger("fahr_server")


def site_of(msg: Message) -> str:
    site = msg.content.config_records.get(keys.SITE)
    if site is not None and keys.SITE_NAME in site:
        return str(site[keys.SITE_NAME])
    return f"node-{msg.metadata.src_node_id}"


# Each site's own privacy parameters: a mean of them describes no site (rounds.jsonl keeps them per site).
PER_SITE_METRICS = (keys.EPSILON, keys.EPSILON_BUDGET, keys.DELTA, keys.NOISE_MULTIPLIER, keys.SAMPLE_RATE)


def ambiguous_replies(replies: list[Message]) -> dict[int, tuple[str, str]]:
    """node -> (site as the logs name it, reason) for replies that cannot be told apart: every reply
    of a node that answered twice, and of nodes declaring a site name another node also declared.

    A site's name is what its reply says; the node id is what the SuperLink authenticated. Neither
    a second reply nor a borrowed name may stand in for another site's.
    """
    per_node = Counter(m.metadata.src_node_id for m in replies)
    per_name = Counter(site_of(m) for m in replies)
    found: dict[int, tuple[str, str]] = {}
    for m in replies:
        node, name = m.metadata.src_node_id, site_of(m)
        if per_node[node] > 1:
            names = ", ".join(sorted({site_of(r) for r in replies if r.metadata.src_node_id == node}))
            found[node] = (f"node {node}", f"{per_node[node]} replies from one node (as {names})")
        elif per_name[name] > 1:
            found[node] = (f"{name} (node {node})", f"{per_name[name]} nodes declared site {name!r}")
    return found


# Flower's strategies build and read messages under these names: the protocol's, not Flower's defaults
RECORD_KEYS = {
    "weighted_by_key": keys.NUM_EXAMPLES,
    "arrayrecord_key": keys.ARRAYS,
    "configrecord_key": keys.CONFIG,
}


def aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means, as FedAvg does, except each site's privacy parameters.

    The federation reports the largest site epsilon instead of a mean of budgets or noise levels.
    """
    agg = aggregate_metricrecords(contents, weight_key)
    for key in PER_SITE_METRICS:
        if key in agg:
            del agg[key]
    spent = [float(c[keys.METRICS][keys.EPSILON]) for c in contents if keys.EPSILON in c[keys.METRICS]]
    if spent:
        agg["epsilon-max"] = max(spent)
    return agg


def robust_aggregator(name: str, trim_fraction: float, krum_malicious: int) -> FedAvg | None:
    """Flower's strategy whose `aggregate_train` combines the screened updates; None: plain FedAvg.

    Screening rejects broken and grossly outlying updates; these rules also bound what a site whose
    poisoned update passes screening can do, at the cost of ignoring how many patients each site has.
    """
    common = {**RECORD_KEYS, "train_metrics_aggr_fn": aggregate_train_metrics}
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed_mean":
        return FedTrimmedAvg(beta=trim_fraction, **common)
    if name == "krum":
        return Krum(num_malicious_nodes=krum_malicious, **common)
    if name == "fedavg":
        return None
    raise ValueError(f"unknown aggregation {name!r}")


class TooFewSites(RuntimeError):
    """Fewer than the minimum number of sites are connected."""


class FahrFedAvg(FedAvg):
    """FedAvg that screens updates, checkpoints every round and can continue an interrupted run.

    `state` is the last committed round's state (`last_round` 0 for a fresh run). Flower's loop counts
    its rounds from 1, so a resumed run's loop round r is federation round `last_round + r`: every
    hook maps it, and sites see the true round (their budget schedule depends on it).
    """

    def __init__(
        self,
        workdir: Path,
        num_rounds: int,
        min_sites: int,
        fraction_train: float,
        metadata: dict[str, str],
        state: FederationState,
        join_timeout_s: float = 600.0,
        secure_sum: SecureSum | None = None,
        age_model: tuple[np.ndarray, str] | None = None,
        aggregator: FedAvg | None = None,
        model: GlobalModel | None = None,
    ):
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            train_metrics_aggr_fn=aggregate_train_metrics,
            **RECORD_KEYS,
        )
        self.workdir = workdir
        self.paths = ServerWorkdir(workdir)
        self.num_rounds = num_rounds
        self.metadata = metadata
        self.site_evaluations: list[dict] = []
        self.join_timeout_s = join_timeout_s
        self._global: dict | None = None  # the weights sent this round, to screen updates against
        self.state = state
        self.offset = state.last_round
        self._sites: dict[int, str] = {}  # node id -> site name, to name a site whose reply is an error
        self._sent: list[Message] = []  # this round's train messages (the grid sets their ids on sending)
        self.secure_sum = secure_sum  # None: sites send weights; else only their sum is learnt
        # the federation's one age model, (file bytes, sha256), sent with the final evaluation for every
        # site's face-age deviation analysis (fahr_core.age.delivery); None: no FAD analysis
        self.age_model = age_model
        self.aggregator = aggregator  # a robust rule from robust_aggregator(); None: FedAvg itself
        self._seen: set[str] = set()  # sites that sent an update in this run (the console's "joined")
        self._round_started = time.monotonic()
        # the spec and frozen base: only the trainable tensors travel (fahr_core.models.finetune);
        # None: the strategy's arrays are the whole model and travel as they are
        self.model = model
        self._base_sent = False

    def _await_sites(self, grid: Grid) -> None:
        """Fail the run with a clear message instead of waiting forever for missing sites."""
        deadline = time.monotonic() + self.join_timeout_s
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TooFewSites(
                    f"only {connected} of the {self.min_available_nodes} required sites connected within "
                    f"{self.join_timeout_s:.0f} s ([federation].join_timeout_s); stopping the federation"
                )
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_sites(grid)
        self._round_started = time.monotonic()
        connected = len(list(grid.get_node_ids()))
        emit(
            self.workdir,
            "round_started",
            round=server_round + self.offset,
            rounds=self.num_rounds,
            connected=connected,
        )
        weights = arrays.to_torch_state_dict()
        # each site refuses to train if its ledger shows less than this (a reset or lost ledger)
        config[keys.SPEND_ON_RECORD] = encode_spend_on_record(self.state.site_rounds, self.state.site_epsilon)
        outgoing = self.outgoing(arrays)
        sent = list(super().configure_train(server_round + self.offset, outgoing, config, grid))
        self.remember_round(weights, sent)
        return sent

    def remember_round(self, weights: dict, sent: list[Message]) -> None:
        """Keep this round's global weights (updates are screened against them) and its train messages
        (the grid set their ids on sending; an error reply names its site only through them). Public so
        a round can be set up without a grid, to drive aggregate_train with chosen replies."""
        self._global = weights
        self._sent = sent

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The trainable tensors in the wire dtype, with the frozen base in this process's first round
        and, when only a fraction of the sites trains, in every round (a site may be new to it)."""
        if self.model is None:
            return arrays
        with_base = not self._base_sent or self.fraction_train < 1
        self._base_sent = True
        return ArrayRecord(self.model.outgoing(arrays.to_torch_state_dict(), with_base))

    def _decoded(self, reply: Message) -> Message:
        """A site's reply with its trainable tensors back in float32, as the global model holds them."""
        if self.model is None or reply.has_error() or keys.ARRAYS not in reply.content.array_records:
            return reply
        state = from_wire(reply.content[keys.ARRAYS].to_torch_state_dict(), self.model.spec.wire_dtype)
        reply.content[keys.ARRAYS] = ArrayRecord(state)
        return reply

    def _screen(self, server_round: int, replies: list[Message]) -> tuple[list[Message], dict[str, str]]:
        """Drop replies whose weights are malformed or outliers; log each rejection with its reason.

        Replies are told apart by the node that sent them (`src_node_id`, which the SuperLink sets from
        the SuperNode's authenticated session), never by the site name a reply declares: a node that
        answers twice, or two nodes declaring one site name, are all rejected before the weights are
        looked at, so no reply can hide another's rejection behind a shared name.
        """
        ok = [m for m in replies if not m.has_error()]
        rejected = ambiguous_replies(ok)
        unique = {site_of(m): m for m in ok if m.metadata.src_node_id not in rejected}
        updates = {name: m.content[keys.ARRAYS].to_torch_state_dict() for name, m in unique.items()}
        for name, reason in screen_updates(updates, self._global or {}).items():
            rejected[unique[name].metadata.src_node_id] = (name, reason)
        for site, reason in rejected.values():
            log.warning("round %d: update from site %s rejected: %s", server_round, site, reason)
            with self.paths.rejections_log.open("a") as f:
                f.write(
                    json.dumps({"round": server_round, "site": site, "reason": reason, "at": time.time()})
                    + "\n"
                )
        kept = [m for m in replies if m.has_error() or m.metadata.src_node_id not in rejected]
        return kept, dict(rejected.values())

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        if server_round != self.num_rounds:
            return []
        arrays = self.outgoing(arrays)
        if self.age_model is None:
            return super().configure_evaluate(server_round, arrays, config, grid)
        payload, sha256 = self.age_model
        config[keys.AGE_MODEL_SHA256] = sha256
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        for m in messages:
            m.content[keys.AGE_MODEL] = ArrayRecord([payload])
        return messages

    def _failures(self, replies: list[Message]) -> dict[str, str]:
        """site -> reason for each error reply (a site that died mid-round: Flower's node-unavailable).

        The SuperLink writes such a reply itself, from its own node id, so the site is found from
        the message it answers.
        """
        for m in replies:
            if not m.has_error():
                self._sites[m.metadata.src_node_id] = site_of(m)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        failed = {sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in replies}
        return {
            self._sites.get(node, f"node-{node}"): str(m.error.reason)
            for node, m in failed.items()
            if m.has_error()
        }

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        replies = [self._decoded(m) for m in replies]
        if self.secure_sum is None:
            replies, rejected = self._screen(server_round, list(replies))
            combine = self.aggregator.aggregate_train if self.aggregator else super().aggregate_train
            arrays, metrics = combine(server_round, replies)
        else:  # masked updates cannot be screened one by one (docs/security.md)
            replies, weights = self.secure_sum.run(server_round, replies, self._global or {})
            rejected, arrays = {}, ArrayRecord(weights)
            ok = [m.content for m in replies if not m.has_error()]
            metrics = self.train_metrics_aggr_fn(ok, self.weighted_by_key)
        failures = self._failures(replies)
        record = {
            "round": server_round,
            "finished_at": time.time(),
            "rejected": rejected,
            "sites": {site_of(m): dict(m.content[keys.METRICS]) for m in replies if not m.has_error()},
            "failures": failures,
        }
        if self.secure_sum is not None:
            record["secure_aggregation"] = self.secure_sum.last
        with self.paths.rounds_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        emit_round(self.workdir, record, self._seen)
        if len(record["sites"]) < self.min_train_nodes:
            raise TooFewSites(
                f"round {server_round}: only {len(record['sites'])} of the {self.min_train_nodes} required "
                f"sites sent a usable update (failed: {failures or 'none'}; rejected: {rejected or 'none'}); "
                "stopping the federation. The last completed round can be continued with --resume"
            )
        state = arrays.to_torch_state_dict()
        meta = {**self.metadata, "round": str(server_round)}
        checkpoint = self.paths.checkpoint(server_round)
        save_weights(checkpoint, state if self.model is None else self.model.full(state), meta)
        plain = state if self.model is None else self.model.plain(state)
        save_weights(self.paths.global_model, plain, meta)
        self._commit(server_round, checkpoint, record)
        took = round(time.monotonic() - self._round_started, 1)
        emit(self.workdir, "checkpoint_written", round=server_round, path=str(checkpoint))
        emit(
            self.workdir,
            "round_done",
            round=server_round,
            rounds=self.num_rounds,
            seconds=took,
            sites=len(record["sites"]),
        )
        log.info("round %d: global weights saved (%d sites)", server_round, len(record["sites"]))
        return arrays, metrics

    def _commit(self, server_round: int, checkpoint: Path, record: dict) -> None:
        """Write state.json: from now on a crash resumes after this round."""
        spent = {site: float(m[keys.EPSILON]) for site, m in record["sites"].items() if keys.EPSILON in m}
        rejections = dict(self.state.rejections)
        for site in record["rejected"]:
            rejections[site] = rejections.get(site, 0) + 1
        self.state = replace(
            self.state,
            last_round=server_round,
            checkpoint=str(checkpoint.relative_to(self.workdir)),
            checkpoint_sha256=file_sha256(checkpoint),
            site_epsilon={**self.state.site_epsilon, **spent},  # each site's ledger total, not a sum
            site_rounds={
                site: self.state.site_rounds.get(site, 0) + (site in spent)
                for site in {*self.state.site_rounds, *spent}
            },
            rejections=rejections,
        )
        write_state(self.workdir, self.state)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each site's evaluation for the federation report, which aggregates them itself.

        Flower's mean of the sites' metrics needs every site to send the same keys; a site sends only
        the metrics its held-out patients define (no events: no C-index), and that must not end the run.
        Replies that cannot be told apart (`ambiguous_replies`) are dropped, as in training.
        """
        ok = [m for m in replies if not m.has_error()]
        ambiguous = ambiguous_replies(ok)
        for site, reason in ambiguous.values():
            log.warning("evaluation from site %s dropped: %s", site, reason)
        for m in ok:
            if m.metadata.src_node_id not in ambiguous:
                self.site_evaluations.append({"site": site_of(m), **dict(m.content[keys.METRICS])})
                emit(self.workdir, "evaluation_received", site=site_of(m))
        return None
