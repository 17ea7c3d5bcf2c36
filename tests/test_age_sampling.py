"""Age-balanced oversampling: per-decade frequencies, the cap, and every face kept."""

from __future__ import annotations

import numpy as np
import pytest

from fahr_core.age.sampling import balanced_epoch, oversampling_factors
from fahr_core.age.split import decade
from fahr_core.cohort import demo_faces_dir, load_labelled_faces


def test_rare_decades_are_raised_to_the_largest_up_to_the_cap() -> None:
    ages = [25.0] * 100 + [72.0] * 10 + [95.0] * 2 + [41.0] * 30
    assert oversampling_factors(ages, cap=20) == {2: 1.0, 4: 100 / 30, 7: 10.0, 9: 20.0}
    order = balanced_epoch(ages, np.random.default_rng(0), cap=20)
    bins = np.array([decade(ages[i]) for i in order])
    assert {d: int((bins == d).sum()) for d in (2, 4, 7, 9)} == {2: 100, 4: 100, 7: 100, 9: 40}
    counts = np.bincount(order, minlength=len(ages))
    assert counts.min() >= 1  # no face dropped
    assert set(counts[100:110]) == {10} and set(counts[110:112]) == {20}
    assert set(counts[112:]) <= {3, 4}  # 100/30: each face 3 or 4 times, never further apart
    with pytest.raises(ValueError, match="cap"):
        oversampling_factors(ages, cap=0.5)


def test_balanced_epoch_on_real_ages_is_seeded_and_flattens_decades() -> None:
    ages = [f.age for f in load_labelled_faces(demo_faces_dir())]
    a = balanced_epoch(ages, np.random.default_rng(3), cap=4)
    assert np.array_equal(a, balanced_epoch(ages, np.random.default_rng(3), cap=4))
    assert not np.array_equal(a, balanced_epoch(ages, np.random.default_rng(4), cap=4))
    before = np.bincount([decade(x) for x in ages])
    after = np.bincount([decade(ages[i]) for i in a], minlength=len(before))
    for d in np.flatnonzero(before):
        assert after[d] == round(min(4.0, before.max() / before[d]) * before[d])
    spread = after[before > 0].max() / after[before > 0].min()
    assert spread < before.max() / before[before > 0].min()


def test_a_sized_balanced_epoch_keeps_the_age_mix() -> None:
    ages = [25.0] * 600 + [72.0] * 30 + [41.0] * 300
    order = balanced_epoch(ages, np.random.default_rng(1), cap=20, size=len(ages))
    assert len(order) == len(ages)
    share = np.mean([decade(ages[i]) == 7 for i in order])
    assert share == pytest.approx(1 / 3, abs=0.05)  # 3% of the faces, a third of the epoch
