"""Age-balanced oversampling: the second training stage sees every decade about equally often.

Public face sets are dominated by 20-40 year olds, so a regressor trained on them pulls the old
towards the middle: the "elderly failure mode" that the per-decade MAE exposes. FAHR-FaceAge's
second stage therefore oversamples the rare decades, up to a cap (the paper went up to 20x) so a
handful of centenarians is not repeated into memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fahr_core.age.split import decade

DEFAULT_CAP = 20.0


def oversampling_factors(ages: Sequence[float] | np.ndarray, cap: float = DEFAULT_CAP) -> dict[int, float]:
    """Per decade bin, how many times each of its faces is shown per balanced epoch.

    A bin of n faces is raised towards the largest bin's size, n_max: factor min(cap, n_max / n),
    and never below 1 (no face is dropped).
    """
    if cap < 1.0:
        raise ValueError(f"oversampling cap must be >= 1, got {cap}")
    bins, counts = np.unique([decade(a) for a in ages], return_counts=True)
    if not len(bins):
        return {}
    top = counts.max()
    return {int(b): float(min(cap, top / n)) for b, n in zip(bins, counts, strict=True)}


def balanced_epoch(
    ages: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    cap: float = DEFAULT_CAP,
    size: int | None = None,
) -> np.ndarray:
    """Shuffled indices of one balanced epoch.

    A face of a bin with factor f appears floor(f) times, plus once more for a random
    (f - floor(f)) share of the bin, so each bin's total is round(f * n) and every face of a bin
    appears within one time of the others. With `size`, only the first `size` indices of that
    shuffle are kept: an epoch as long as a general one (oversampling UTKFace to the largest
    decade triples it), with the same age mix in expectation.
    """
    factors = oversampling_factors(ages, cap)
    bins = np.array([decade(a) for a in ages])
    chosen: list[np.ndarray] = []
    for b, f in factors.items():
        members = np.flatnonzero(bins == b)
        whole = int(np.floor(f))
        extra = int(round(f * len(members))) - whole * len(members)
        chosen += [np.tile(members, whole), rng.choice(members, size=extra, replace=False)]
    order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return rng.permutation(order)[:size]
