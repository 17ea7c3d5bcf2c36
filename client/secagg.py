"""Secure aggregation, site side: the protocol's stages over `fahr_core.privacy.secagg`.

Stage 1 is the ordinary train message: the site trains, keeps its update, and answers with fresh
public keys instead of weights. Then `share` (encrypted Shamir shares for each peer), `mask` (the
masked, quantised, example-weighted update) and `unmask` (shares that let the server remove the
masks). Training comes first so that a site failing during its minutes of DP-SGD simply does not
take part; only the seconds between key sharing and masking need the dropout recovery.

Every message runs in a fresh ClientApp process. The round's secrets live in Flower's
Context.state, which the SuperNode keeps in memory for the whole run and hands to each ClientApp
process (flwr 1.42 `supernode`: the context is stored per run after every message), so they are
never written to disk; a restarted SuperNode has lost them and drops out of the round. The
update itself (the site's own data) waits in the site's workdir and is deleted once masked.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from fahr_core.config import SiteConfig
from fahr_core.io import atomic_write_bytes
from fahr_core.privacy import secagg
from fahr_core.privacy.randomness import fresh_stream
from fahr_core.privacy.secagg import Quantiser, SecAggError, SiteSecrets
from fahr_core.protocol import keys

STATE = "fahr-secagg"


class SecAggReply(NamedTuple):
    """What a stage sends, and what the outbound check needs to judge it."""

    payload: dict[str, np.ndarray]
    participants: tuple[int, ...]
    n_params: int
    metrics: dict[str, float]


def protocol_context(run_id: int, server_round: int) -> bytes:
    """Bound into every encrypted share, so none can be replayed in another run or round."""
    return f"fahr-secagg run {run_id} round {server_round}".encode()


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def begin(
    context: Context,
    cfg: SiteConfig,
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    num_examples: int,
    server_round: int,
) -> SecAggReply:
    """After training: keep the update, make this round's secrets, send their public keys."""
    update = secagg.flat_update(trained, received)
    buf = io.BytesIO()
    np.save(buf, update)
    atomic_write_bytes(cfg.paths.secagg_update, buf.getvalue())
    secrets = SiteSecrets.new()
    context.state[STATE] = ConfigRecord(
        {
            "round": server_round,
            keys.NUM_EXAMPLES: num_examples,
            "enc-key": secrets.enc_key,
            "mask-key": secrets.mask_key,
            "seed": secrets.seed,
        }
    )
    enc, mask = secrets.public_keys()
    return SecAggReply({keys.ENC_PK: _bytes(enc), keys.MASK_PK: _bytes(mask)}, (), update.size, {})


def _state(context: Context, server_round: int) -> tuple[ConfigRecord, SiteSecrets]:
    st = context.state.get(STATE)
    if st is None or int(st["round"]) != server_round:
        raise SecAggError(
            f"no secure-aggregation keys for round {server_round} (the SuperNode restarted since, "
            "or the server skipped a stage); this site drops out of the round"
        )
    return st, SiteSecrets(bytes(st["enc-key"]), bytes(st["mask-key"]), bytes(st["seed"]))


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content[keys.SECAGG].items()}


def share(msg: Message, context: Context, cfg: SiteConfig, server_round: int) -> SecAggReply:
    """Encrypt, for every participant, its shares of our self-mask seed and mask key."""
    st, secrets = _state(context, server_round)
    me, config, arrays = context.node_id, msg.content[keys.CONFIG], _arrays(msg)
    enc_keys = secagg.arrays_to_blobs(arrays, keys.ENC_PK)
    mask_keys = secagg.arrays_to_blobs(arrays, keys.MASK_PK)
    if (enc_keys.get(me), mask_keys.get(me)) != secrets.public_keys():
        raise SecAggError("the server did not forward this site's own public keys unchanged")
    if set(enc_keys) != set(mask_keys):
        raise SecAggError("the server sent encryption and mask keys for different sites")
    threshold = int(config[keys.SECAGG_THRESHOLD])
    ciphertexts = secagg.encrypt_shares(
        secrets, me, enc_keys, threshold, protocol_context(msg.metadata.run_id, server_round)
    )
    st["threshold"] = threshold
    for node in enc_keys:
        st[f"{keys.ENC_PK}/{node}"], st[f"{keys.MASK_PK}/{node}"] = enc_keys[node], mask_keys[node]
    participants = tuple(sorted(enc_keys))
    return SecAggReply(secagg.blobs_to_arrays(keys.SHARE_TO, ciphertexts), participants, 0, {})


def _keys(st: ConfigRecord, prefix: str) -> dict[int, bytes]:
    return {int(k.split("/")[1]): bytes(v) for k, v in st.items() if k.startswith(prefix + "/")}


def mask(msg: Message, context: Context, cfg: SiteConfig, server_round: int) -> SecAggReply:
    """Quantise our example-weighted update and add the self mask and the pairwise masks."""
    st, secrets = _state(context, server_round)
    me, config = context.node_id, msg.content[keys.CONFIG]
    inbox = secagg.arrays_to_blobs(_arrays(msg), keys.SHARE_FROM)
    mask_keys = _keys(st, keys.MASK_PK)
    threshold = int(st["threshold"])
    if me not in inbox or not set(inbox) <= set(mask_keys) or len(inbox) < threshold:
        raise SecAggError(
            f"the server forwarded shares from {sorted(inbox)}; expected at least {threshold} of the "
            f"participants {sorted(mask_keys)}, this site included"
        )
    quantiser = Quantiser(float(config[keys.SECAGG_CLIP]), int(config[keys.SECAGG_LEVELS]))
    if not quantiser.fits(len(inbox)):
        raise SecAggError(f"{quantiser.levels} levels for {len(inbox)} sites would wrap around the modulus")
    for node, blob in inbox.items():
        st[f"inbox/{node}"] = blob
    weight = int(st[keys.NUM_EXAMPLES]) / float(config[keys.SECAGG_TOTAL_EXAMPLES])
    if not 0 < weight <= 1:
        raise SecAggError(
            f"the server's total of {config[keys.SECAGG_TOTAL_EXAMPLES]} examples is below this site's "
            f"{st[keys.NUM_EXAMPLES]}"
        )
    update = np.load(cfg.paths.secagg_update)
    quantised, clipped = quantiser.quantise(weight * update, fresh_stream("secagg stochastic rounding"))
    masked = secagg.mask_input(quantised, secrets, me, {u: mask_keys[u] for u in inbox})
    cfg.paths.secagg_update.unlink()
    return SecAggReply(
        {keys.MASKED: masked}, tuple(sorted(inbox)), update.size, {keys.SECAGG_CLIPPED: clipped}
    )


def unmask(msg: Message, context: Context, cfg: SiteConfig, server_round: int) -> SecAggReply:
    """Reveal seed shares of the survivors and mask-key shares of the dropped sites, never both."""
    st, secrets = _state(context, server_round)
    me, config = context.node_id, msg.content[keys.CONFIG]
    inbox = _keys(st, "inbox")
    opened = secagg.decrypt_shares(
        secrets, me, _keys(st, keys.ENC_PK), inbox, protocol_context(msg.metadata.run_id, server_round)
    )
    seeds, revealed = secagg.reveal_shares(
        opened,
        me,
        sorted(inbox),
        [int(v) for v in config[keys.SECAGG_SURVIVORS]],
        [int(v) for v in config[keys.SECAGG_DROPPED]],
        int(st["threshold"]),
    )
    del context.state[STATE]  # the round is over for this site: its secrets are not needed again
    payload = {
        **secagg.blobs_to_arrays(keys.SEED_SHARE, seeds),
        **secagg.blobs_to_arrays(keys.KEY_SHARE, revealed),
    }
    return SecAggReply(payload, tuple(sorted(inbox)), 0, {})


# the stages after training, as Flower train actions
STAGES = {keys.SECAGG_SHARE: share, keys.SECAGG_MASK: mask, keys.SECAGG_UNMASK: unmask}
