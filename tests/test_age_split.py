"""The fixed decade-stratified split behind every reported age result."""

from __future__ import annotations

import numpy as np
import pytest

from fahr_core.age.split import decade, decade_split
from fahr_core.cohort import demo_faces_dir, load_labelled_faces


def test_decade_bins_merge_the_very_old() -> None:
    assert [decade(a) for a in (0, 9.9, 10, 89, 90, 116)] == [0, 0, 1, 8, 9, 9]


def test_split_is_stratified_disjoint_and_order_independent() -> None:
    faces = load_labelled_faces(demo_faces_dir())
    names = [f.path.name for f in faces]
    ages = [f.age for f in faces]
    train, val = decade_split(names, ages)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(faces)
    for d in {decade(a) for a in ages}:
        n = sum(decade(a) == d for a in ages)
        assert sum(decade(ages[i]) == d for i in val) == round(0.15 * n)
    order = np.random.default_rng(5).permutation(len(faces))
    train2, val2 = decade_split([names[i] for i in order], [ages[i] for i in order])
    assert {names[order[i]] for i in val2} == {names[i] for i in val}
    assert decade_split(names, ages, seed=1)[1] != val


def test_split_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        decade_split(["a.jpg", "a.jpg"], [20, 30])
