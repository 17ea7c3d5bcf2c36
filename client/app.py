"""The Flower ClientApp: a thin adapter from Flower messages to `fahr_client.runtime.SiteRuntime`.

Every reply goes through `_reply`: the outbound check (the one gate for what may leave the site)
and then the site's append-only audit log, before it is handed to Flower. A handler that fails
tells the server only that it failed (`SiteDeclined`); the reason goes to the site's own log.

The SuperNode passes the site's config file in its node config (`site-config`); nothing about
the site comes from the server except the global weights, the round and the model settings.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fahr_client import secagg
from fahr_client.runtime import SiteRuntime
from fahr_core.config import ModelConfig, SiteConfig, load_site_config
from fahr_core.models.finetune import from_wire, to_wire, trainable_part
from fahr_core.privacy.audit import append_audit
from fahr_core.privacy.ledger import spend_on_record
from fahr_core.protocol import keys
from fahr_core.protocol.outbound import check_outbound, check_secagg_outbound
from fahr_core.protocol.spec import spec_from_record
from fahr_core.release import fahr_version
from fahr_ops.processes import seconds_since_process_start

app = ClientApp()
log = logging.getLogger("fahr_client")


class VersionMismatch(RuntimeError):
    """The server runs another fahr version than the one this site installed and reviewed."""


def _runtime(context: Context) -> SiteRuntime:
    path = context.node_config.get(keys.SITE_CONFIG)
    if not path:
        raise RuntimeError(
            f"SuperNode was started without node config '{keys.SITE_CONFIG}'; use `fahr-client start`"
        )
    return SiteRuntime(load_site_config(str(path)))


def round_info(config: Mapping) -> tuple[ModelConfig, int, int]:
    """Model settings, round and planned rounds from the server's config; refuses another fahr version."""
    ours, theirs = fahr_version(), str(config.get(keys.FAHR_VERSION, "unknown"))
    if theirs != ours:
        raise VersionMismatch(
            f"the server runs fahr {theirs}, this site runs fahr {ours}; refusing the round"
        )
    return spec_from_record(config), int(config[keys.SERVER_ROUND]), int(config[keys.NUM_ROUNDS])


Handler = Callable[[Message, Context], Message]


class SiteDeclined(RuntimeError):
    """What the server learns when a handler fails: that it failed, not why.

    Flower sends the text of a ClientApp's exception to the server. Reasons can describe the site's
    data (a budget, a cohort row, the size of a split), so they stay in the site's own log.
    """


def _keep_reasons_local(handler: Handler) -> Handler:
    """Wrap a ClientApp handler so that only VersionMismatch (public: two version strings) says why."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except VersionMismatch:
            raise
        except Exception:
            log.exception("the %s message was refused or failed", msg.metadata.message_type)
            raise SiteDeclined("the site declined the message; the reason is in the site's own log") from None

    return wrapped


def _reply(
    msg: Message,
    site: SiteRuntime,
    server_round: int,
    metrics: dict,
    state: dict[str, torch.Tensor] | None = None,
    received: dict[str, torch.Tensor] | None = None,
    secure: secagg.SecAggReply | None = None,
) -> Message:
    arrays = state or {}
    check_outbound(arrays, received or {}, metrics)
    payload = secure.payload if secure is not None else {}
    if secure is not None:
        check_secagg_outbound(payload, secure.participants, secure.n_params)
    append_audit(
        site.cfg.paths.audit,
        msg.metadata.message_type,
        server_round,
        int(msg.metadata.run_id),
        {**arrays, **{f"{keys.SECAGG}/{k}": torch.from_numpy(v) for k, v in payload.items()}},
        metrics,
    )
    content = {keys.METRICS: MetricRecord(metrics), keys.SITE: ConfigRecord({keys.SITE_NAME: site.cfg.name})}
    if state is not None:
        content[keys.ARRAYS] = ArrayRecord(state)
    if payload:
        content[keys.SECAGG] = ArrayRecord({k: Array(v) for k, v in payload.items()})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
@_keep_reasons_local
def train(msg: Message, context: Context) -> Message:
    startup, started = seconds_since_process_start(), time.perf_counter()
    site = _runtime(context)
    spec, server_round, num_rounds = round_info(msg.content[keys.CONFIG])
    arrays = msg.content[keys.ARRAYS].to_torch_state_dict()
    recorded = spend_on_record(msg.content[keys.CONFIG], site.cfg.name)
    trained, metrics = site.train_round(arrays, spec, server_round, num_rounds, recorded, msg.metadata.run_id)
    # only the trainable tensors go back, as they came (fahr_core.models.finetune)
    received, state = trainable_part(arrays, spec), to_wire(trained, spec.wire_dtype)
    secure = None
    if msg.content[keys.CONFIG].get(keys.SECURE_AGGREGATION, False):  # the weights wait here; keys go instead
        start = from_wire(received, spec.wire_dtype)
        n = int(metrics[keys.NUM_EXAMPLES])
        secure = secagg.begin(context, site.cfg, start, trained, n, server_round)
    sent = secure.payload.values() if secure is not None else state.values()
    metrics = {**metrics, keys.BYTES_SENT: float(sum(v.nbytes for v in sent))}
    # timings stay in the site's log: how long a round took depends on the data (fahr_core.protocol.outbound)
    seconds = time.perf_counter() - started
    log.info("round %d: process start-up %.1f s, handler %.1f s", server_round, startup, seconds)
    if secure is not None:
        return _reply(msg, site, server_round, metrics, secure=secure)
    return _reply(msg, site, server_round, metrics, state, received)


def _secagg_stage(stage: Callable[[Message, Context, SiteConfig, int], secagg.SecAggReply]):
    """A ClientApp handler for one secure-aggregation stage after training (see fahr_client.secagg)."""

    def handler(msg: Message, context: Context) -> Message:
        site = _runtime(context)
        _, server_round, _ = round_info(msg.content[keys.CONFIG])
        secure = stage(msg, context, site.cfg, server_round)
        return _reply(msg, site, server_round, secure.metrics, secure=secure)

    return handler


for _action, _stage in secagg.STAGES.items():
    app.train(_action)(_keep_reasons_local(_secagg_stage(_stage)))


@app.evaluate()
@_keep_reasons_local
def evaluate(msg: Message, context: Context) -> Message:
    site = _runtime(context)
    spec, server_round, num_rounds = round_info(msg.content[keys.CONFIG])
    meta = {
        "server_round": server_round,
        "num_rounds": num_rounds,
        "run_id": int(msg.metadata.run_id),
        "fahr_version": fahr_version(),
    }
    site.admit_evaluation(meta["run_id"], server_round)  # counted and audited before any scoring
    age_model, age = None, msg.content.array_records.get(keys.AGE_MODEL)  # the federation's, if any
    if age is not None:
        sha256 = str(msg.content[keys.CONFIG][keys.AGE_MODEL_SHA256])
        age_model = site.receive_age_model(age.to_numpy_ndarrays()[0], sha256)
    metrics, _ = site.evaluate(msg.content[keys.ARRAYS].to_torch_state_dict(), spec, meta, age_model)
    return _reply(msg, site, server_round, metrics)
