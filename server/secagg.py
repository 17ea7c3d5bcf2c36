"""Secure aggregation, server side: drives the stages after training and recovers the sum.

The sites' train replies (stage 1) carry public keys and scalar metrics, no weights. The server
then routes public keys (`share`), routes each site's encrypted shares to their recipients and
collects masked updates (`mask`), and asks the survivors for the shares that remove the masks
(`unmask`). It sees every site's masked update, and from them only their sum.

Each site sends its update weighted by its share of the examples, n_i / N (N over the sites that
shared keys); if some drop out before masking, the sum is rescaled by N / (examples of the
survivors), which is exactly FedAvg over the survivors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fahr_core.privacy import secagg
from fahr_core.privacy.secagg import Quantiser, SecAggError
from fahr_core.protocol import keys

log = logging.getLogger("fahr_server")

SHARE, MASK, UNMASK = (
    f"train.{stage}" for stage in (keys.SECAGG_SHARE, keys.SECAGG_MASK, keys.SECAGG_UNMASK)
)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content[keys.SECAGG].items()}


class SecureSum:
    """The stages after training, for one federation (`run` once per round)."""

    def __init__(self, grid: Grid, round_config: ConfigRecord, clip: float, timeout: float):
        self.grid = grid
        self.round_config = round_config
        self.clip = clip
        self.timeout = timeout
        self.last: dict = {}  # what the last round did: sites, dropouts, the quantisation bound

    def _exchange(
        self, stage: str, server_round: int, per_node: Mapping[int, tuple[dict, dict[str, np.ndarray]]]
    ) -> tuple[dict[int, Message], list[Message]]:
        """Send each node its config and arrays; return the good replies by node, and the error replies."""
        messages = [
            Message(
                content=RecordDict(
                    {
                        keys.CONFIG: ConfigRecord(
                            {**self.round_config, keys.SERVER_ROUND: server_round, **config}
                        ),
                        keys.SECAGG: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    }
                ),
                message_type=stage,
                dst_node_id=node,
            )
            for node, (config, arrays) in per_node.items()
        ]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        ok = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        failed = [m for m in replies if m.has_error()]
        for m in failed:
            log.warning(
                "round %d, %s: node %d failed: %s", server_round, stage, m.metadata.src_node_id, m.error
            )
        return ok, failed

    def run(
        self, server_round: int, replies: Iterable[Message], reference: Mapping[str, torch.Tensor]
    ) -> tuple[list[Message], dict[str, torch.Tensor] | None]:
        """From the train replies to the FedAvg of the surviving sites' weights.

        Returns the train replies of the sites whose updates are in the sum (for their metrics)
        together with every error reply of the round, and the new global weights.
        """
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        setup = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        if len(setup) < 2:
            raise SecAggError(
                f"round {server_round}: {len(setup)} site(s) trained; secure aggregation needs 2"
            )
        threshold = secagg.min_threshold(len(setup))
        public_keys = {
            f"{kind}/{node}": _arrays(m)[kind]
            for node, m in setup.items()
            for kind in (keys.ENC_PK, keys.MASK_PK)
        }
        shared, bad = self._exchange(
            SHARE, server_round, {node: ({keys.SECAGG_THRESHOLD: threshold}, public_keys) for node in setup}
        )
        failed += bad
        _require(len(shared), threshold, server_round, "shared their keys")
        outboxes = {u: secagg.arrays_to_blobs(_arrays(m), keys.SHARE_TO) for u, m in shared.items()}
        total = sum(int(setup[u].content[keys.METRICS][keys.NUM_EXAMPLES]) for u in shared)
        quantiser = Quantiser.for_sites(self.clip, len(shared))
        mask_config = {
            keys.SECAGG_TOTAL_EXAMPLES: total,
            keys.SECAGG_CLIP: quantiser.clip,
            keys.SECAGG_LEVELS: quantiser.levels,
        }
        masked_replies, bad = self._exchange(
            MASK,
            server_round,
            {
                v: (mask_config, secagg.blobs_to_arrays(keys.SHARE_FROM, {u: outboxes[u][v] for u in shared}))
                for v in shared
            },
        )
        failed += bad
        _require(len(masked_replies), threshold, server_round, "sent their masked update")
        survivors, dropped = sorted(masked_replies), sorted(set(shared) - set(masked_replies))
        unmasking, bad = self._exchange(
            UNMASK,
            server_round,
            {v: ({keys.SECAGG_SURVIVORS: survivors, keys.SECAGG_DROPPED: dropped}, {}) for v in survivors},
        )
        failed += bad
        _require(len(unmasking), threshold, server_round, "revealed their shares")
        seed_shares: dict[int, dict[int, bytes]] = {}
        key_shares: dict[int, dict[int, bytes]] = {}
        for v, m in unmasking.items():
            index = secagg.share_index(list(setup), v)  # sites number shares over all who trained
            for prefix, held in ((keys.SEED_SHARE, seed_shares), (keys.KEY_SHARE, key_shares)):
                for u, share in secagg.arrays_to_blobs(_arrays(m), prefix).items():
                    held.setdefault(u, {})[index] = share
        mask_keys = {u: secagg.arrays_to_blobs(public_keys, keys.MASK_PK)[u] for u in shared}
        summed = secagg.unmask_sum(
            {v: _arrays(masked_replies[v])[keys.MASKED] for v in survivors},
            mask_keys,
            seed_shares,
            key_shares,
            list(shared),
            threshold,
        )
        kept = sum(int(setup[v].content[keys.METRICS][keys.NUM_EXAMPLES]) for v in survivors)
        update = quantiser.dequantise(summed) * (total / kept)
        self.last = {
            "sites": len(survivors),
            "dropped_after_keys": len(dropped),
            "threshold": threshold,
            "max_abs_error": quantiser.sum_error_bound(len(survivors)) * total / kept,
            "clipped_values": sum(
                int(masked_replies[v].content[keys.METRICS][keys.SECAGG_CLIPPED]) for v in survivors
            ),
        }
        log.info("round %d: secure sum of %d sites (%s)", server_round, len(survivors), self.last)
        return [setup[v] for v in survivors] + failed, secagg.apply_update(reference, update)


def _require(count: int, threshold: int, server_round: int, what: str) -> None:
    if count < threshold:
        raise SecAggError(
            f"round {server_round}: only {count} sites {what}; secure aggregation needs {threshold} "
            "(a majority of the sites that trained)"
        )
