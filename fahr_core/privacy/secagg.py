"""Secure aggregation (Bonawitz et al., CCS 2017): the server learns the sum of the sites' updates only.

Each site adds to its quantised update a self mask (from a secret seed b) and, for every other
site, a pairwise mask from an X25519 key agreement; pairwise masks cancel in the sum, self masks
are removed once the survivors reveal Shamir shares of b. If a site drops out after sharing its
keys, the survivors reveal shares of its mask key instead, so the server can remove the pairwise
masks the survivors added for it. A round survives dropouts as long as `threshold` sites answer.

This is the SecAgg+ protocol with a complete neighbour graph: SecAgg+'s sparse graph saves work
for thousands of phones, not for tens of hospitals. Arithmetic is modulo 2**32. Everything here
is plain functions over bytes and numpy arrays; the Flower stages live in fahr_server.secagg and
fahr_client.secagg. Primitives: X25519, HKDF-SHA256, AES-256-GCM and ChaCha20 (`cryptography`),
Shamir sharing over GF(2^128) (pycryptodome, as Flower's SecAgg+ uses).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fahr_core.privacy.randomness import SecureStream

KEY_BYTES = 32  # X25519 keys, self-mask seeds
SHARE_BYTES = 32  # a Shamir share of a 32-byte secret: two 16-byte GF(2^128) chunks
NONCE_BYTES = 12
# sender id, recipient id, share of b, share of the mask key; AES-GCM nonce and tag around it
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + 16 + 2 * SHARE_BYTES + 16
MODULUS_BITS = 32
_SIGNED_MAX = 2 ** (MODULUS_BITS - 1) - 1

State = Mapping[str, torch.Tensor]


class SecAggError(RuntimeError):
    """The protocol cannot go on: too few sites left, or a message that does not fit it."""


def min_threshold(n_sites: int) -> int:
    """Fewest shares that reconstruct a secret: a strict majority, and never below 2.

    A majority is what stops a server from collecting, for the same site, enough shares of both
    its self-mask seed (claiming it survived) and its mask key (claiming it dropped) from two
    disjoint groups of honest sites.
    """
    return max(2, n_sites // 2 + 1)


@dataclass(frozen=True)
class Quantiser:
    """Maps each site's weighted update, clipped to [-clip, clip] per coordinate, to integers mod 2**32.

    `levels` integers per `clip` are chosen so that the sum of `n_sites` inputs cannot wrap around;
    stochastic rounding keeps each site's quantised input unbiased. The sum of n inputs is off by
    less than n * step per coordinate (`sum_error_bound`), not counting clipping.
    """

    clip: float
    levels: int

    @classmethod
    def for_sites(cls, clip: float, n_sites: int) -> Quantiser:
        if clip <= 0 or n_sites < 1:
            raise ValueError(f"need clip > 0 and at least one site, got clip={clip}, n_sites={n_sites}")
        return cls(clip, _SIGNED_MAX // n_sites)

    @property
    def step(self) -> float:
        return self.clip / self.levels

    def fits(self, n_sites: int) -> bool:
        """Whether the sum of `n_sites` inputs stays clear of wrapping around the modulus."""
        return self.levels * n_sites <= _SIGNED_MAX

    def sum_error_bound(self, n_sites: int) -> float:
        return n_sites * self.step

    def quantise(self, x: np.ndarray, rng: SecureStream) -> tuple[np.ndarray, int]:
        """Unbiased integers for `x` as uint32 (two's complement), and how many coordinates were clipped.

        A site passes a secret stream (fresh_stream): predictable rounding would let the server
        strip part of the rounding noise from the sum.
        """
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        scaled = np.clip(x.astype(np.float64), -self.clip, self.clip) / self.step
        low = np.floor(scaled)
        q = low + (rng.random(scaled.shape) < (scaled - low))
        return q.astype(np.int64).astype(np.uint32), clipped

    def dequantise(self, total: np.ndarray) -> np.ndarray:
        """The float sum from the (unmasked) uint32 sum of the sites' quantised inputs."""
        return total.astype(np.uint32).view(np.int32).astype(np.float64) * self.step


def flat_update(state: State, reference: State) -> np.ndarray:
    """state - reference over the floating-point tensors, in sorted name order, as one float64 vector."""
    names = [k for k in sorted(reference) if reference[k].dtype.is_floating_point]
    return np.concatenate(
        [(state[k].double() - reference[k].double()).reshape(-1).numpy() for k in names] or [np.zeros(0)]
    )


def apply_update(reference: State, update: np.ndarray) -> dict[str, torch.Tensor]:
    """reference + update (the inverse of `flat_update`), in each tensor's own dtype."""
    out, at = {}, 0
    for name in sorted(reference):
        ref = reference[name]
        if not ref.dtype.is_floating_point:
            out[name] = ref.clone()
            continue
        part = torch.from_numpy(update[at : at + ref.numel()].reshape(ref.shape))
        out[name] = (ref.double() + part).to(ref.dtype)
        at += ref.numel()
    if at != update.size:
        raise SecAggError(f"the aggregate has {update.size} values, the model {at}")
    return {k: out[k] for k in reference}


@dataclass(frozen=True)
class SiteSecrets:
    """A site's secrets for one round: they leave the site only as Shamir shares, encrypted to each peer."""

    enc_key: bytes  # X25519 private key: encrypts the shares sent to each peer
    mask_key: bytes  # X25519 private key: pairwise masks
    seed: bytes  # self-mask seed b

    @classmethod
    def new(cls) -> SiteSecrets:
        raw = [X25519PrivateKey.generate().private_bytes_raw() for _ in range(2)]
        return cls(raw[0], raw[1], os.urandom(KEY_BYTES))

    def public_keys(self) -> tuple[bytes, bytes]:
        return _public(self.enc_key), _public(self.mask_key)


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive from their X25519 keys; `purpose` separates its uses."""
    try:
        peer = X25519PublicKey.from_public_bytes(public)
    except ValueError:
        raise SecAggError(f"not an X25519 public key ({len(public)} bytes)") from None
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError:  # a low-order point: no shared secret
        raise SecAggError("the peer's X25519 public key gives no shared secret") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"fahr-secagg " + purpose).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint32 from a 32-byte seed (ChaCha20 key stream): only the seed's holders can remove it."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * n)), dtype="<u4").astype(np.uint32, copy=False)


def _share(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """Shamir shares 1..n of a 32-byte secret (the share for party i is list index i - 1)."""
    halves = [Shamir.split(threshold, n, secret[i : i + 16], ssss=False) for i in (0, 16)]
    return [a + b for (_, a), (_, b) in zip(*halves, strict=True)]


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The 32-byte secret from shares keyed by their 1-based index."""
    halves = [Shamir.combine([(i, s[h : h + 16]) for i, s in shares.items()], ssss=False) for h in (0, 16)]
    return halves[0] + halves[1]


def share_index(participants: Sequence[int], node: int) -> int:
    return sorted(participants).index(node) + 1


def encrypt_shares(
    secrets: SiteSecrets,
    me: int,
    enc_keys: Mapping[int, bytes],
    threshold: int,
    context: bytes,
) -> dict[int, bytes]:
    """For each participant (itself included), its shares of our seed and mask key, encrypted to it.

    `enc_keys` are the participants' encryption public keys as routed by the server; `context`
    (run and round) is bound into every ciphertext so none can be replayed in another round.
    """
    ids = sorted(enc_keys)
    if me not in enc_keys:
        raise SecAggError(f"node {me} is not among the participants {ids}")
    if threshold < min_threshold(len(ids)) or threshold > len(ids):
        raise SecAggError(
            f"threshold {threshold} for {len(ids)} sites; need {min_threshold(len(ids))}..{len(ids)}"
        )
    seed_shares = _share(secrets.seed, threshold, len(ids))
    key_shares = _share(secrets.mask_key, threshold, len(ids))
    out = {}
    for i, peer in enumerate(ids):
        key = _agree(secrets.enc_key, enc_keys[peer], b"shares")
        plain = struct.pack("<QQ", me, peer) + seed_shares[i] + key_shares[i]
        nonce = os.urandom(NONCE_BYTES)
        out[peer] = nonce + AESGCM(key).encrypt(nonce, plain, context)
    return out


def decrypt_shares(
    secrets: SiteSecrets, me: int, enc_keys: Mapping[int, bytes], inbox: Mapping[int, bytes], context: bytes
) -> dict[int, tuple[bytes, bytes]]:
    """sender -> (its seed share, its mask-key share) for us; refuses anything forged or misrouted."""
    opened = {}
    for sender, blob in inbox.items():
        if sender not in enc_keys:
            raise SecAggError(f"shares from node {sender}, which is not a participant")
        key = _agree(secrets.enc_key, enc_keys[sender], b"shares")
        try:
            plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
        except InvalidTag:
            raise SecAggError(
                f"shares from node {sender} do not decrypt (forged or from another round)"
            ) from None
        src, dst = struct.unpack("<QQ", plain[:16])
        if (src, dst) != (sender, me):
            raise SecAggError(f"shares labelled {src}->{dst} arrived as {sender}->{me}")
        opened[sender] = (plain[16 : 16 + SHARE_BYTES], plain[16 + SHARE_BYTES :])
    return opened


def _pairwise(
    mask_key: bytes, me: int, mask_keys: Mapping[int, bytes], peers: Sequence[int], n: int
) -> np.ndarray:
    """Sum of the pairwise masks `me` adds for `peers`: +mask towards larger ids, -mask towards smaller."""
    total = np.zeros(n, dtype=np.uint32)
    for peer in peers:
        mask = prg(_agree(mask_key, mask_keys[peer], b"mask"), n)
        total = total + mask if me < peer else total - mask
    return total


def mask_input(
    quantised: np.ndarray, secrets: SiteSecrets, me: int, mask_keys: Mapping[int, bytes]
) -> np.ndarray:
    """Our quantised input plus our self mask and the pairwise masks with every other participant."""
    n = quantised.size
    peers = [p for p in mask_keys if p != me]
    return (
        quantised.astype(np.uint32)
        + prg(secrets.seed, n)
        + _pairwise(secrets.mask_key, me, mask_keys, peers, n)
    )


def reveal_shares(
    opened: Mapping[int, tuple[bytes, bytes]],
    me: int,
    participants: Sequence[int],
    survivors: Sequence[int],
    dropped: Sequence[int],
    threshold: int,
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Our seed shares for the survivors and our mask-key shares for the dropped sites.

    Never both for one site, and only when at least `threshold` sites survive: either would let
    the server strip a live site's masks and read its update.
    """
    surv, drop = set(survivors), set(dropped)
    if surv & drop:
        raise SecAggError(f"sites {sorted(surv & drop)} are claimed to have both survived and dropped")
    if not surv | drop <= set(participants):
        raise SecAggError(f"sites {sorted((surv | drop) - set(participants))} never shared keys this round")
    if me not in surv:
        raise SecAggError(f"node {me} sent its masked input but is not listed among the survivors")
    if len(surv) < threshold:
        raise SecAggError(f"only {len(surv)} sites survived; at least {threshold} are needed to unmask")
    missing = sorted((surv | drop) - set(opened))
    if missing:
        raise SecAggError(f"no shares held for sites {missing}")
    return {u: opened[u][0] for u in sorted(surv)}, {u: opened[u][1] for u in sorted(drop)}


def unmask_sum(
    masked: Mapping[int, np.ndarray],
    mask_keys: Mapping[int, bytes],
    seed_shares: Mapping[int, Mapping[int, bytes]],
    key_shares: Mapping[int, Mapping[int, bytes]],
    participants: Sequence[int],
    threshold: int,
) -> np.ndarray:
    """The sum of the survivors' quantised inputs (uint32), from their masked inputs and the revealed shares.

    masked: survivor -> masked input; seed_shares: survivor -> {share index: share};
    key_shares: dropped site -> {share index: share}. Dropped = participants that sent no masked input.
    """
    survivors = sorted(masked)
    dropped = sorted(set(participants) - set(masked))
    if len(survivors) < threshold:
        raise SecAggError(f"only {len(survivors)} masked inputs; at least {threshold} are needed")
    n = next(iter(masked.values())).size
    total = np.zeros(n, dtype=np.uint32)
    for v in survivors:
        if masked[v].size != n:
            raise SecAggError(f"masked input of node {v} has {masked[v].size} values, expected {n}")
        total += masked[v].astype(np.uint32)
    for v in survivors:
        total -= prg(_reconstruct(seed_shares, v, threshold, "self-mask seed"), n)
    for u in dropped:
        key = _reconstruct(key_shares, u, threshold, "mask key")
        # the survivors added, for u, the negative of the pairwise masks u would have added for them
        total += _pairwise(key, u, mask_keys, survivors, n)
    return total


def _reconstruct(shares: Mapping[int, Mapping[int, bytes]], node: int, threshold: int, what: str) -> bytes:
    held = shares.get(node, {})
    if len(held) < threshold:
        raise SecAggError(f"{len(held)} shares of node {node}'s {what}; {threshold} are needed")
    return combine(dict(list(held.items())[:threshold]))


def blobs_to_arrays(prefix: str, blobs: Mapping[int, bytes]) -> dict[str, np.ndarray]:
    """Per-site byte strings as named uint8 arrays (`prefix/node`), the form they travel in."""
    return {f"{prefix}/{node}": np.frombuffer(blob, dtype=np.uint8).copy() for node, blob in blobs.items()}


def arrays_to_blobs(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[int, bytes]:
    """The inverse of `blobs_to_arrays` for the names under `prefix`."""
    return {int(k.split("/", 1)[1]): v.tobytes() for k, v in arrays.items() if k.startswith(prefix + "/")}
