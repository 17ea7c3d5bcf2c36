"""Secure aggregation's Flower stages in one process: the server driver against the real ClientApp.

A grid stand-in hands each message to `fahr_client.app.app` (its outbound gate and audit log
included) and can make a site fail a stage, which is how a dropout looks to the server.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fahr_client import secagg as site_secagg
from fahr_client.app import app as client_app
from fahr_core.cohort import demo_faces_dir
from fahr_core.config import ModelConfig, load_site_config
from fahr_core.models.finetune import GlobalModel, build
from fahr_core.privacy.audit import verify_audit_log
from fahr_core.privacy.secagg import Quantiser, SecAggError
from fahr_core.protocol.spec import spec_to_record
from fahr_core.release import fahr_version
from fahr_server.secagg import SecureSum
from tests.support import make_sites

SIZES = {11: 30, 22: 20, 33: 10}  # node id -> training examples


class LocalGrid:
    """Delivers messages to the ClientApp in this process; `fail` maps a node to the stage it fails."""

    def __init__(self, contexts: dict[int, Context], fail: dict[int, str]):
        self.contexts, self.fail = contexts, fail

    def send_and_receive(self, messages, timeout=None):
        for m in messages:
            node = m.metadata.dst_node_id
            if self.fail.get(node) == m.metadata.message_type:
                yield Message(Error(code=0, reason="site went away"), reply_to=m)
            else:
                yield client_app(m, self.contexts[node])


@pytest.fixture(params=["full", "lora"])
def federation(request, tmp_path, monkeypatch):
    """Three sites that have trained (stage 1 done): their contexts, train replies and weights.

    Under LoRA the weights are the adapters and the head only: all that is masked and summed."""
    for key, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)
    tomls = make_sites(tmp_path, demo_faces_dir(), (12, 12, 12))
    torch.manual_seed(0)
    spec = replace(ModelConfig(arch="vit_micro"), finetune=request.param)
    global_model, reference = GlobalModel.start(build(spec), spec)
    contexts, replies, trained = {}, [], {}
    for (node, n), toml in zip(SIZES.items(), tomls, strict=True):
        contexts[node] = Context(7, node, {"site-config": str(toml)}, RecordDict(), {})
        trained[node] = {k: v + 1e-3 * torch.randn_like(v) for k, v in reference.items()}
        sent = site_secagg.begin(contexts[node], load_site_config(toml), reference, trained[node], n, 1)
        ask = Message(RecordDict(), dst_node_id=node, message_type="train")
        arrays = ArrayRecord({k: Array(v) for k, v in sent.payload.items()})
        content = {"metrics": MetricRecord({"num-examples": n}), "secagg": arrays}
        replies.append(Message(RecordDict(content), reply_to=ask))
    config = ConfigRecord(
        {
            **spec_to_record(global_model.spec),
            "num-rounds": 1,
            "fahr-version": fahr_version(),
            "secure-aggregation": True,
        }
    )
    return contexts, replies, trained, reference, config, tomls


def test_a_site_dropping_before_masking_leaves_the_fedavg_of_the_others(federation):
    contexts, replies, trained, reference, config, tomls = federation
    driver = SecureSum(LocalGrid(contexts, {33: "train.secagg_mask"}), config, 1.0, 10.0)
    kept, weights = driver.run(1, replies, reference)

    survivors = (11, 22)
    assert sorted(m.metadata.src_node_id for m in kept if not m.has_error()) == list(survivors)
    assert [m.metadata.src_node_id for m in kept if m.has_error()] == [33]
    total = sum(SIZES[v] for v in survivors)
    bound = Quantiser.for_sites(1.0, 3).sum_error_bound(2) * (sum(SIZES.values()) / total)
    assert driver.last["dropped_after_keys"] == 1 and driver.last["max_abs_error"] == pytest.approx(bound)
    for k in reference:
        fedavg = sum(SIZES[v] * trained[v][k].double() for v in survivors) / total
        assert (weights[k].double() - fedavg).abs().max().item() <= bound + 2e-7 * fedavg.abs().max().item()
    # each site logged what it sent: survivors share, mask, unmask; the dropped site only shared
    logged = [verify_audit_log(load_site_config(t).paths.audit) for t in tomls]
    assert logged == [3, 3, 1]
    assert not load_site_config(tomls[0]).paths.secagg_update.exists()  # deleted once masked


def test_a_middle_site_dropping_while_sharing_keys_leaves_the_fedavg_of_the_others(federation):
    """Shares are numbered over every site that trained; a gap in the middle must not shift them."""
    contexts, replies, trained, reference, config, _ = federation
    driver = SecureSum(LocalGrid(contexts, {22: "train.secagg_share"}), config, 1.0, 10.0)
    kept, weights = driver.run(1, replies, reference)
    survivors = (11, 33)
    assert sorted(m.metadata.src_node_id for m in kept if not m.has_error()) == list(survivors)
    total = sum(SIZES[v] for v in survivors)
    bound = driver.last["max_abs_error"]
    for k in reference:
        fedavg = sum(SIZES[v] * trained[v][k].double() for v in survivors) / total
        assert (weights[k].double() - fedavg).abs().max().item() <= bound + 2e-7 * fedavg.abs().max().item()


def test_too_few_sites_left_to_unmask_fails_the_round_clearly(federation):
    contexts, replies, _, reference, config, _ = federation
    grid = LocalGrid(contexts, {22: "train.secagg_unmask", 33: "train.secagg_unmask"})
    with pytest.raises(SecAggError, match="only 1 sites revealed their shares; secure aggregation needs 2"):
        SecureSum(grid, config, 1.0, 10.0).run(1, replies, reference)
