"""The Flower ServerApp: build the initial model, run FedAvg, write the federation report.

It runs inside the SuperLink's ServerApp process; `fahr-server run` passes the path of the server
config file as the run config key `config-path`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fahr_core.age.delivery import age_model_payload
from fahr_core.config import ServerConfig, load_server_config
from fahr_core.io import atomic_write_json
from fahr_core.models.checkpoint import load_weights
from fahr_core.models.finetune import GlobalModel, prepare
from fahr_core.models.initial import initial_model
from fahr_core.protocol import keys
from fahr_core.protocol.spec import spec_to_record
from fahr_core.protocol.wire import metrics_to_summary
from fahr_core.release import fahr_version
from fahr_core.report.federation import write_federation_report
from fahr_server.events import emit
from fahr_server.secagg import SecureSum
from fahr_server.state import FederationState, model_record, resume_point
from fahr_server.strategy import FahrFedAvg, robust_aggregator

app = ServerApp()
log = logging.getLogger("fahr_server")


def global_start(
    cfg: ServerConfig, checkpoint: dict[str, torch.Tensor] | None = None
) -> tuple[GlobalModel, dict[str, torch.Tensor]]:
    """The global model (spec with its base hash, frozen base) and the trainable tensors of round 1,
    from the initial model or, resuming, from a round's checkpoint (base and trainable, unmerged)."""
    model = prepare(initial_model(cfg.model), cfg.model)
    if checkpoint is not None:
        model.load_state_dict(checkpoint)
    return GlobalModel.start(model, cfg.model)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_server_config(str(context.run_config[keys.CONFIG_PATH]))
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    meta = {
        "fahr_version": fahr_version(),
        "arch": cfg.model.arch,
        "img_size": str(cfg.model.img_size),
        "finetune": cfg.model.finetune,
    }
    if context.run_config.get(keys.RESUME):
        state = resume_point(cfg)
        weights = load_weights(cfg.workdir / state.checkpoint)  # base and trainable tensors, unmerged
        log.info("resuming after round %d of %d from %s", state.last_round, state.rounds, state.checkpoint)
    else:
        state = FederationState(0, cfg.rounds, "", "", fahr_version(), model_record(cfg))
        weights = None
    global_model, trainable = global_start(cfg, weights)
    log.info(
        "fine-tuning %s: %d trainable tensors travel as %s; frozen base sha256 %s",
        cfg.model.finetune,
        len(trainable),
        cfg.model.wire_dtype,
        global_model.spec.base_sha256,
    )
    round_config = ConfigRecord(
        {
            **spec_to_record(global_model.spec),
            keys.NUM_ROUNDS: cfg.rounds,
            keys.FAHR_VERSION: fahr_version(),
            keys.SECURE_AGGREGATION: cfg.secure_aggregation,
        }
    )
    secure_sum = (
        SecureSum(grid, round_config, cfg.secagg_clip, cfg.round_timeout_s)
        if cfg.secure_aggregation
        else None
    )
    strategy = FahrFedAvg(
        cfg.workdir,
        cfg.rounds,
        cfg.min_sites,
        cfg.fraction_train,
        meta,
        state,
        join_timeout_s=cfg.join_timeout_s,
        secure_sum=secure_sum,
        age_model=age_model_payload(Path(cfg.model.age_checkpoint)) if cfg.model.age_checkpoint else None,
        aggregator=robust_aggregator(cfg.aggregation, cfg.trim_fraction, cfg.krum_malicious),
        model=global_model,
    )
    if cfg.model.age_checkpoint:
        log.info("age model for the sites' FAD analysis: %s", cfg.model.age_checkpoint)
    started = time.time()
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(trainable),
            num_rounds=cfg.rounds - state.last_round,
            timeout=cfg.round_timeout_s,
            train_config=round_config,
            evaluate_config=round_config,
        )
    except Exception as e:  # the operator's console shows why; Flower's log (run.log) has the trace
        emit(cfg.workdir, "run_failed", reason=str(e) or type(e).__name__)
        raise
    summaries = [metrics_to_summary(e["site"], e) for e in strategy.site_evaluations]
    report = write_federation_report(
        cfg.paths.report,
        summaries,
        {
            **meta,
            "rounds": cfg.rounds,
            "run_id": int(context.run_id),
            "seconds": round(time.time() - started, 1),
        },
    )
    atomic_write_json(
        cfg.paths.run_summary,
        {
            "rounds": cfg.rounds,
            "completed_rounds": list(range(1, strategy.state.last_round + 1)),
            "sites_reporting": [s["site"] for s in summaries],
            "c_index_weighted_mean": report["c_index_weighted_mean"],
        },
    )
    log.info("federation report: %s", cfg.paths.report_page)
    emit(cfg.workdir, "report_written", path=str(cfg.paths.report_page))
