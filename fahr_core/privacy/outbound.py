"""What may leave a site, decided here and nowhere else.

A site sends the server only (a) model weights with exactly the names, shapes and dtypes of the
global model it received, and (b) named scalar metrics from a fixed list. Nothing whose size
depends on the number of patients can pass these checks, so per-patient data cannot leak by
accident through a new field someone adds to a reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

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
