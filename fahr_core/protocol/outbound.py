"""What may leave a site, decided here and nowhere else.

A site sends the server only (a) model weights with exactly the names, shapes and dtypes of the
global model it received, (b) named scalar metrics from the allow-list below, and (c) under secure
aggregation, the protocol's fields at sizes the protocol fixes. Nothing whose size depends on
the number of patients can pass these checks, so per-patient data cannot leak by accident
through a new field someone adds to a reply.

Every metric on the allow-list has one release class, which says why sending it is safe:

- ``DP``: a post-processing of the site's DP-SGD release, covered by the round's charge to the
  privacy ledger (the released weights themselves are in this class).
- ``PUBLIC``: a function of configuration (the site's, the server's round plan, the model's size)
  and of the training count ``num-examples``, which is released anyway; it depends neither on
  the global weights nor on any patient's outcome or photo. The privacy accounting values are
  here: noise multiplier, sample rate, steps and epsilon follow from the budget, the plan, the
  ledger's history and the training counts of this and earlier rounds.
- ``AGGREGATE``: a statistic of a split's patients, released without noise only over at least
  ``MIN_PATIENTS`` patients and, where outcomes enter it, ``MIN_EVENTS`` events; below that it is
  suppressed (`suppress_small_cells`) and the gate refuses it (`check_outbound`). The training
  count ``num-examples`` is such an aggregate (FedAvg needs it as the site's weight): a site with
  fewer than ``MIN_PATIENTS`` training patients cannot send it, so it cannot take part in training.

Nothing a site sends depends on the loss the global weights give its patients or on how long it
took to compute: the training loss and the site's timings stay in the site's own log, because with
crafted global weights either would tell the server whether one patient is in the data.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from enum import StrEnum

import numpy as np
import torch

from fahr_core.privacy.secagg import KEY_BYTES, SHARE_BYTES, SHARE_CIPHERTEXT_BYTES
from fahr_core.protocol import keys

MIN_PATIENTS = 10  # the smallest number of patients a non-DP aggregate may describe
MIN_EVENTS = 5  # the smallest number of events an outcome statistic may rest on


class Release(StrEnum):
    """Why a metric may leave the site (see the module docstring)."""

    DP = "DP, charged to the ledger"
    PUBLIC = "public: configuration and released counts"
    AGGREGATE = f"aggregate over >= {MIN_PATIENTS} patients and >= {MIN_EVENTS} events, else suppressed"


_DP, _PUBLIC, _AGG = Release.DP, Release.PUBLIC, Release.AGGREGATE

# Every scalar a site may send: name -> (release class, what it is). Widening this is a reviewed
# change: tests/test_outbound.py pins the names and classes as a literal.
ALLOW_LIST: dict[str, tuple[Release, str]] = {
    # training reply (fahr_client.runtime.SiteRuntime.train_round, fahr_client.app)
    keys.NUM_EXAMPLES: (_AGG, "patients in the split the reply is about: the FedAvg weight, the held-out n"),
    keys.EPSILON: (_PUBLIC, "the site's cumulative epsilon from its ledger (RDP over every step ever taken)"),
    keys.DELTA: (_PUBLIC, "the delta the ledger accounts at"),
    keys.EPSILON_BUDGET: (_PUBLIC, "the site's configured epsilon budget"),
    keys.NOISE_MULTIPLIER: (
        _PUBLIC,
        "this round's noise multiplier, calibrated from budget, plan and ledger",
    ),
    keys.SAMPLE_RATE: (_PUBLIC, "this round's Poisson sampling rate, from batch size and training count"),
    keys.STEPS: (_PUBLIC, "this round's DP-SGD steps, from epochs and the sample rate"),
    keys.BYTES_SENT: (_PUBLIC, "bytes of weights or protocol fields sent: fixed by model and protocol"),
    # secure aggregation's mask stage (fahr_client.secagg.mask)
    keys.SECAGG_CLIPPED: (_DP, "values of the DP-noised update clipped by the quantiser: post-processing"),
    # held-out evaluation (the result fields marked wire(key), fahr_core.protocol.wire.FIELDS)
    "events": (_AGG, "events among the held-out patients"),
    "c-index": (_AGG, "Harrell's C of the global model on the held-out patients"),
    "c-index-low": (_AGG, "its 95% CI"),
    "c-index-high": (_AGG, "its 95% CI"),
    "uno-c": (_AGG, "Uno's C"),
    "uno-c-low": (_AGG, "its 95% CI"),
    "uno-c-high": (_AGG, "its 95% CI"),
    "logrank-p": (_AGG, "log-rank p, top vs bottom risk group"),
    "hr-top-bottom": (_AGG, "hazard ratio, top vs bottom risk quartile"),
    "hr-top-bottom-low": (_AGG, "its 95% CI"),
    "hr-top-bottom-high": (_AGG, "its 95% CI"),
    "hr-sd-adj": (_AGG, "hazard ratio per SD of risk, adjusted for age and sex"),
    "hr-sd-adj-low": (_AGG, "its 95% CI"),
    "hr-sd-adj-high": (_AGG, "its 95% CI"),
    "fad-mean": (_AGG, "mean face-age deviation"),
    "fad-mean-abs": (_AGG, "mean absolute face-age deviation"),
    "fad-risk-r": (_AGG, "Pearson r of face-age deviation and risk"),
    "fad-risk-r-low": (_AGG, "its 95% CI"),
    "fad-risk-r-high": (_AGG, "its 95% CI"),
    "fad-hr-decade": (_AGG, "hazard ratio per decade of face-age deviation, adjusted"),
    "fad-hr-decade-low": (_AGG, "its 95% CI"),
    "fad-hr-decade-high": (_AGG, "its 95% CI"),
    "fad-lr-p": (_AGG, "likelihood-ratio p of what FAD adds to the risk score"),
    "risk-lr-p": (_AGG, "likelihood-ratio p of what the risk score adds to FAD"),
    "saliency-similarity": (_AGG, "similarity of the two models' mean saliency maps"),
}


class OutboundViolation(RuntimeError):
    """A reply would carry something a site must never send."""


def weights_mismatch(arrays: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why `arrays` is not a finite copy of `reference`'s names, shapes and dtypes; None if it is.

    Used at both ends: a site checks what it sends, the server checks what it receives.
    """
    if set(arrays) != set(reference):
        extra, missing = sorted(set(arrays) - set(reference)), sorted(set(reference) - set(arrays))
        return f"weights differ from the global model: extra {extra[:5]}, missing {missing[:5]}"
    for name, value in arrays.items():
        ref = reference[name]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            return (
                f"{name}: shape/dtype {tuple(value.shape)}/{value.dtype} differs from the global "
                f"model's {tuple(ref.shape)}/{ref.dtype}"
            )
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            return f"{name}: non-finite values"
    return None


def small_cell_problem(metrics: Mapping[str, float | int]) -> str | None:
    """Why the aggregates in `metrics` describe too few patients or events; None if they may go.

    A count of patients needs MIN_PATIENTS of them; any statistic of outcomes also needs `events`
    sent beside it, at least MIN_EVENTS of them.
    """
    aggregates = sorted(k for k in metrics if k in ALLOW_LIST and ALLOW_LIST[k][0] is Release.AGGREGATE)
    if not aggregates:
        return None
    n = metrics.get("num-examples")
    if n is None or n < MIN_PATIENTS:
        return f"{', '.join(aggregates)} describe {n} patient(s), fewer than {MIN_PATIENTS}"
    if aggregates != ["num-examples"]:
        events = metrics.get("events")
        if events is None or events < MIN_EVENTS:
            return f"{', '.join(aggregates)} rest on {events} event(s), fewer than {MIN_EVENTS}"
    return None


def suppress_small_cells(metrics: Mapping[str, float | int]) -> dict[str, float | int]:
    """`metrics` without any aggregate if they describe too few patients or events (the small-cell rule)."""
    if small_cell_problem(metrics) is None:
        return dict(metrics)
    return {k: v for k, v in metrics.items() if ALLOW_LIST.get(k, (None,))[0] is not Release.AGGREGATE}


def check_outbound(
    arrays: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float | int],
) -> None:
    """Raise OutboundViolation unless `arrays` mirror `reference` and `metrics` are allowed scalars
    whose aggregates pass the small-cell rule."""
    problem = weights_mismatch(arrays, reference)
    if problem:
        raise OutboundViolation(f"{problem}; refusing to send")
    for key, value in metrics.items():
        if key not in ALLOW_LIST:
            raise OutboundViolation(f"metric {key!r} is not on the list of metrics a site may send")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise OutboundViolation(f"metric {key!r} must be a finite number, got {value!r}")
    problem = small_cell_problem(metrics)
    if problem:
        raise OutboundViolation(f"small-cell rule: {problem}; refusing to send")


# secure-aggregation fields: name (before "/node") -> dtype and length, fixed by the protocol
SECAGG_FIELDS = {
    keys.ENC_PK: (np.uint8, KEY_BYTES),
    keys.MASK_PK: (np.uint8, KEY_BYTES),
    keys.SHARE_TO: (np.uint8, SHARE_CIPHERTEXT_BYTES),
    keys.SEED_SHARE: (np.uint8, SHARE_BYTES),
    keys.KEY_SHARE: (np.uint8, SHARE_BYTES),
    keys.MASKED: (np.uint32, None),  # one value per floating-point model parameter
}


def check_secagg_outbound(
    payload: Mapping[str, np.ndarray], participants: Collection[int], n_params: int
) -> None:
    """Raise OutboundViolation unless every array is a secure-aggregation field of its fixed size.

    Keys, encrypted shares and shares have protocol-fixed byte lengths, one per participating
    site at most; the masked input has exactly one value per model parameter. None can grow
    with the number of patients.
    """
    for name, value in payload.items():
        field, _, node = name.partition("/")
        if field not in SECAGG_FIELDS:
            raise OutboundViolation(f"secure-aggregation field {name!r} is not part of the protocol")
        if node and (not node.isdigit() or int(node) not in participants):
            raise OutboundViolation(f"secure-aggregation field {name!r} names no participating site")
        dtype, size = SECAGG_FIELDS[field]
        size = n_params if size is None else size
        if value.dtype != dtype or value.shape != (size,):
            raise OutboundViolation(
                f"secure-aggregation field {name!r}: {value.dtype}{list(value.shape)}, "
                f"expected {np.dtype(dtype)}[{size}]; refusing to send"
            )
