"""The Flower ClientApp: a thin adapter from Flower messages to `fahr_core.site.SiteRuntime`.

Every reply passes `check_outbound` right before it is handed to Flower: the one gate for what
leaves the site.

The SuperNode passes the site's config file in its node config (`site-config`); nothing about
the site comes from the server except the global weights, the round and the model settings.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fahr_core.config import ModelConfig, load_site_config
from fahr_core.privacy.outbound import check_outbound
from fahr_core.processes import seconds_since_process_start
from fahr_core.site import SiteRuntime

app = ClientApp()
log = logging.getLogger("fahr_client")


def _runtime(context: Context) -> SiteRuntime:
    path = context.node_config.get("site-config")
    if not path:
        raise RuntimeError("SuperNode was started without node config 'site-config'; use `fahr-client start`")
    return SiteRuntime(load_site_config(str(path)))


def _round_info(msg: Message) -> tuple[ModelConfig, int, int]:
    config = msg.content["config"]
    return ModelConfig.from_record(config), int(config["server-round"]), int(config["num-rounds"])


def _cost(state: dict, started: float, startup: float) -> dict[str, float]:
    """What this message cost: process start-up (interpreter + imports), handler time, bytes of weights."""
    return {
        "startup-seconds": startup,
        "handler-seconds": time.perf_counter() - started,
        "bytes-sent": float(sum(v.numel() * v.element_size() for v in state.values())),
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    startup, started = seconds_since_process_start(), time.perf_counter()
    site = _runtime(context)
    spec, server_round, num_rounds = _round_info(msg)
    received = msg.content["arrays"].to_torch_state_dict()
    state, metrics = site.train_round(received, spec, server_round, num_rounds)
    metrics = {**metrics, **_cost(state, started, startup)}
    check_outbound(state, received, metrics)
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(state),
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"name": site.cfg.name}),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _runtime(context)
    spec, server_round, num_rounds = _round_info(msg)
    meta = {
        "server_round": server_round,
        "num_rounds": num_rounds,
        "run_id": int(msg.metadata.run_id),
        "fahr_version": str(msg.content["config"].get("fahr-version", "")),
    }
    metrics, _ = site.evaluate(msg.content["arrays"].to_torch_state_dict(), spec, meta)
    check_outbound({}, {}, metrics)
    return Message(
        RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.cfg.name})}),
        reply_to=msg,
    )
