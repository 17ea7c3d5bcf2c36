"""The fixed, documented train/validation split of a labelled face set, stratified by decade.

Every age result fahr reports on UTKFace uses this split (seed 0, 15% validation), and MAE
pre-training for those results sees only the training part, so validation faces are never seen,
not even unlabelled. The split depends only on file names and ages, not on file order or on which
faces later pass alignment QC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VALIDATION_FRACTION = 0.15
SEED = 0
TOP_DECADE = 9  # 90 and over form one bin: too few faces to split further


def decade(age: float) -> int:
    """The decade bin of an age: 0 for 0-9 years, ..., 9 for 90 and over."""
    return min(int(age // 10), TOP_DECADE)


def decade_split(
    names: Sequence[str],
    ages: Sequence[float],
    fraction: float = VALIDATION_FRACTION,
    seed: int = SEED,
) -> tuple[list[int], list[int]]:
    """Indices (train, validation): in each decade, `round(fraction * n)` faces drawn with `seed`.

    Within a decade the faces are sorted by name before the seeded permutation, so the split is the
    same whatever order the labels file lists them in.
    """
    if len(names) != len(ages):
        raise ValueError(f"{len(names)} names but {len(ages)} ages")
    if len(set(names)) != len(names):
        raise ValueError("face names must be unique to split reproducibly")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    validation: list[int] = []
    bins = np.array([decade(a) for a in ages])
    for d in range(TOP_DECADE + 1):
        members = sorted(np.flatnonzero(bins == d).tolist(), key=lambda i: names[i])
        if not members:
            continue
        order = [members[i] for i in rng.permutation(len(members))]
        k = round(fraction * len(members))
        validation += order[:k]
        train += order[k:]
    return sorted(train), sorted(validation)
