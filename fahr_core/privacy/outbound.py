"""What may leave a site, decided here and nowhere else.

A site sends the server only (a) model weights with exactly the names, shapes and dtypes of the
global model it received, (b) named scalar metrics from a fixed list, and (c) under secure
aggregation, the protocol's fields at sizes the protocol fixes. Nothing whose size depends on
the number of patients can pass these checks, so per-patient data cannot leak by accident
through a new field someone adds to a reply.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
import torch

from fahr_core.privacy.secagg import KEY_BYTES, SHARE_BYTES, SHARE_CIPHERTEXT_BYTES
from fahr_core.report.wire import SUMMARY_METRICS

TRAINING_METRICS = frozenset(
    {
        "num-examples",
        "train-loss",
        "epsilon",
        "delta",
        "epsilon-budget",
        "noise-multiplier",
        "sample-rate",
        "steps",
        "train-seconds",
        "startup-seconds",
        "handler-seconds",
        "bytes-sent",
        "secagg-clipped",
    }
)
ALLOWED_METRICS = TRAINING_METRICS | SUMMARY_METRICS


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


def check_outbound(
    arrays: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    metrics: Mapping[str, float | int],
) -> None:
    """Raise OutboundViolation unless `arrays` mirror `reference` and `metrics` are allowed scalars."""
    problem = weights_mismatch(arrays, reference)
    if problem:
        raise OutboundViolation(f"{problem}; refusing to send")
    for key, value in metrics.items():
        if key not in ALLOWED_METRICS:
            raise OutboundViolation(f"metric {key!r} is not on the list of metrics a site may send")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise OutboundViolation(f"metric {key!r} must be a finite number, got {value!r}")


# secure-aggregation fields: name (before "/node") -> dtype and length, fixed by the protocol
SECAGG_FIELDS = {
    "enc-pk": (np.uint8, KEY_BYTES),
    "mask-pk": (np.uint8, KEY_BYTES),
    "share-to": (np.uint8, SHARE_CIPHERTEXT_BYTES),
    "seed-share": (np.uint8, SHARE_BYTES),
    "key-share": (np.uint8, SHARE_BYTES),
    "masked": (np.uint32, None),  # one value per floating-point model parameter
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
