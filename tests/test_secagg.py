"""Secure aggregation, the protocol alone: what one masked input reveals, and what the sum recovers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fahr_core.config import ConfigError, server_config_from_dict
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy import secagg
from fahr_core.privacy.secagg import Quantiser, SecAggError, SiteSecrets
from fahr_core.protocol.outbound import OutboundViolation, check_secagg_outbound

CONTEXT = b"run 1 round 1"


def masked_round(
    inputs: dict[int, np.ndarray], clip: float = 1.0, drop_after_sharing: tuple[int, ...] = ()
) -> tuple[np.ndarray, dict[int, np.ndarray], Quantiser]:
    """All four stages for sites keyed by node id; returns the unmasked float sum and the masked inputs."""
    ids = sorted(inputs)
    threshold = secagg.min_threshold(len(ids))
    secrets = {i: SiteSecrets.new() for i in ids}
    enc_keys = {i: s.public_keys()[0] for i, s in secrets.items()}
    mask_keys = {i: s.public_keys()[1] for i, s in secrets.items()}
    outboxes = {i: secagg.encrypt_shares(secrets[i], i, enc_keys, threshold, CONTEXT) for i in ids}
    quantiser = Quantiser.for_sites(clip, len(ids))
    rng = np.random.default_rng(0)
    masked = {
        i: secagg.mask_input(quantiser.quantise(inputs[i], rng)[0], secrets[i], i, mask_keys)
        for i in ids
        if i not in drop_after_sharing
    }
    survivors = sorted(masked)
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for v in survivors:
        inbox = {u: outboxes[u][v] for u in ids}
        opened = secagg.decrypt_shares(secrets[v], v, enc_keys, inbox, CONTEXT)
        seeds, keys = secagg.reveal_shares(opened, v, ids, survivors, list(drop_after_sharing), threshold)
        index = secagg.share_index(ids, v)
        for u, share in seeds.items():
            seed_shares.setdefault(u, {})[index] = share
        for u, share in keys.items():
            key_shares.setdefault(u, {})[index] = share
    total = secagg.unmask_sum(masked, mask_keys, seed_shares, key_shares, ids, threshold)
    return quantiser.dequantise(total), masked, quantiser


def test_masked_input_is_uniform_and_independent_of_the_update():
    """What the server receives from one site alone looks the same whatever the site's update was."""
    n = 20_000
    rng = np.random.default_rng(1)
    zero = np.zeros(n)
    large = rng.uniform(-0.9, 0.9, n)  # as different from zero as the clip range allows
    _, masked_zero, _ = masked_round({11: zero, 22: rng.normal(0, 0.01, n), 33: rng.normal(0, 0.01, n)})
    _, masked_large, _ = masked_round({11: large, 22: rng.normal(0, 0.01, n), 33: rng.normal(0, 0.01, n)})
    a, b = masked_zero[11] / 2.0**32, masked_large[11] / 2.0**32
    assert stats.kstest(a, "uniform").pvalue > 0.001
    assert stats.kstest(b, "uniform").pvalue > 0.001
    assert stats.ks_2samp(a, b).pvalue > 0.001
    # the masked vector does not track the update coordinate by coordinate (|r| ~ 1/sqrt(n) = 0.007)
    assert abs(stats.pearsonr(b, large).statistic) < 0.04
    assert abs(stats.spearmanr(b, large).statistic) < 0.04
    # and without the mask the quantised input tracks the update perfectly: the test can tell
    q, _ = Quantiser.for_sites(1.0, 3).quantise(large, rng)
    assert stats.spearmanr(q.view(np.int32), large).statistic > 0.999


def test_sum_of_real_model_updates_within_the_quantisation_bound():
    """Three sites' example-weighted updates of a real ViT: the unmasked sum is their FedAvg."""
    torch.manual_seed(0)
    reference = SurvivalViT("vit_micro", 112, 10).state_dict()
    sizes = {101: 50, 202: 40, 303: 30}
    total = sum(sizes.values())
    states = {
        i: {k: v + 1e-3 * (j + 1) * torch.randn_like(v) for k, v in reference.items()}
        for j, i in enumerate(sizes)
    }
    inputs = {i: sizes[i] / total * secagg.flat_update(states[i], reference) for i in sizes}
    summed, _, quantiser = masked_round(inputs)
    aggregate = secagg.apply_update(reference, summed)
    fedavg = {k: sum(sizes[i] * states[i][k].double() for i in sizes) / total for k in reference}
    bound = quantiser.sum_error_bound(len(sizes))
    assert bound < 1e-8
    for k in reference:
        assert aggregate[k].dtype == reference[k].dtype and aggregate[k].shape == reference[k].shape
        # float32 storage of the result adds its own rounding on top of the quantisation bound
        tol = bound + 2e-7 * fedavg[k].abs().max().item()
        assert (aggregate[k].double() - fedavg[k]).abs().max().item() <= tol, k
    assert sum(v.numel() for v in reference.values() if v.dtype.is_floating_point) == summed.size


def test_one_site_dropping_after_sharing_keys_still_gives_the_others_sum():
    rng = np.random.default_rng(2)
    inputs = {i: rng.uniform(-0.5, 0.5, 5000) for i in (5, 7, 9)}
    summed, _, quantiser = masked_round(inputs, drop_after_sharing=(7,))
    expected = inputs[5] + inputs[9]
    assert np.abs(summed - expected).max() <= quantiser.sum_error_bound(3)
    assert np.abs(summed - sum(inputs.values())).max() > 0.1  # the dropped site's input is not in it


def test_too_many_dropouts_fail_clearly():
    rng = np.random.default_rng(3)
    inputs = {i: rng.uniform(-0.5, 0.5, 100) for i in (1, 2, 3)}
    with pytest.raises(SecAggError, match="only 1 sites survived; at least 2 are needed"):
        masked_round(inputs, drop_after_sharing=(2, 3))


def test_clipping_is_counted_and_the_sum_stays_within_range():
    q = Quantiser.for_sites(0.1, 4)
    ints, clipped = q.quantise(np.array([0.05, -0.2, 0.3, 0.0]), np.random.default_rng(0))
    assert clipped == 2
    assert np.allclose(q.dequantise(ints), [0.05, -0.1, 0.1, 0.0], atol=q.step)
    # four sites at the extreme of the range do not wrap around the modulus
    extreme = np.full(3, q.levels, dtype=np.int64).astype(np.uint32)
    assert np.allclose(q.dequantise(extreme * np.uint32(4)), 0.4, atol=q.step)


def test_quantisation_is_unbiased():
    q = Quantiser(clip=1.0, levels=4)  # coarse on purpose: step 0.25
    x = np.full(200_000, 0.1)
    mean = q.dequantise(q.quantise(x, np.random.default_rng(0))[0]).mean()
    assert abs(mean - 0.1) < 0.002


def test_a_site_refuses_to_reveal_both_secrets_of_one_site_or_to_unmask_too_few():
    ids = [1, 2, 3]
    opened = {u: (b"s" * 32, b"k" * 32) for u in ids}
    with pytest.raises(SecAggError, match="both survived and dropped"):
        secagg.reveal_shares(opened, 1, ids, [1, 2, 3], [3], 2)
    with pytest.raises(SecAggError, match="never shared keys"):
        secagg.reveal_shares(opened, 1, ids, [1, 2, 4], [], 2)
    with pytest.raises(SecAggError, match="not listed among the survivors"):
        secagg.reveal_shares(opened, 1, ids, [2, 3], [1], 2)
    seeds, keys = secagg.reveal_shares(opened, 1, ids, [1, 2], [3], 2)
    assert sorted(seeds) == [1, 2] and sorted(keys) == [3]


def test_shares_are_bound_to_sender_recipient_and_round():
    secrets = {i: SiteSecrets.new() for i in (1, 2, 3)}
    enc = {i: s.public_keys()[0] for i, s in secrets.items()}
    out = secagg.encrypt_shares(secrets[1], 1, enc, 2, CONTEXT)
    assert all(len(c) == secagg.SHARE_CIPHERTEXT_BYTES for c in out.values())
    assert set(secagg.decrypt_shares(secrets[2], 2, enc, {1: out[2]}, CONTEXT)) == {1}
    with pytest.raises(SecAggError, match="another round"):
        secagg.decrypt_shares(secrets[2], 2, enc, {1: out[2]}, b"run 1 round 2")
    with pytest.raises(SecAggError, match="do not decrypt"):
        secagg.decrypt_shares(secrets[2], 2, enc, {1: out[3]}, CONTEXT)  # meant for site 3
    with pytest.raises(SecAggError, match="threshold 1 for 3 sites"):
        secagg.encrypt_shares(secrets[1], 1, enc, 1, CONTEXT)


def test_outbound_gate_admits_only_protocol_fields_of_fixed_size():
    ok = {
        "enc-pk": np.zeros(secagg.KEY_BYTES, np.uint8),
        "share-to/7": np.zeros(secagg.SHARE_CIPHERTEXT_BYTES, np.uint8),
        "masked": np.zeros(10, np.uint32),
    }
    check_secagg_outbound(ok, participants=[7, 8], n_params=10)
    for bad, match in (
        ({"masked": np.zeros(11, np.uint32)}, "expected uint32\\[10\\]"),  # e.g. one value per patient
        ({"masked": np.zeros(10, np.float32)}, "expected uint32"),
        ({"share-to/9": np.zeros(secagg.SHARE_CIPHERTEXT_BYTES, np.uint8)}, "names no participating site"),
        ({"risk-scores": np.zeros(10, np.uint32)}, "not part of the protocol"),
        ({"key-share/7": np.zeros(secagg.SHARE_BYTES + 1, np.uint8)}, "expected uint8"),
    ):
        with pytest.raises(OutboundViolation, match=match):
            check_secagg_outbound(bad, participants=[7, 8], n_params=10)


def test_server_config_switch_is_validated(tmp_path):
    on = server_config_from_dict({"federation": {"secure_aggregation": True}}, "s.toml", tmp_path)
    assert on.secure_aggregation and on.secagg_clip == 1.0
    assert not server_config_from_dict({}, "s.toml", tmp_path).secure_aggregation  # off by default
    for fed, match in (
        ({"secure_aggregation": "yes"}, "secure_aggregation must be true or false"),
        ({"secure_aggregation": True, "min_sites": 1}, "needs min_sites >= 2"),
        ({"secagg_clip": 0.0}, "secagg_clip must be > 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            server_config_from_dict({"federation": fed}, "s.toml", tmp_path)
