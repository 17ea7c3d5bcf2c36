"""Patient-level train/test split, stratified by event and reproducible from a seed.

Splitting by patient (never by photo) keeps a patient's photos on one side, so test scores are
not inflated by near-duplicate faces. Stratifying by event keeps deaths on both sides: a test
set without events has no comparable pairs and its C-index is undefined.
"""

from __future__ import annotations

import numpy as np

from fahr_core.cohort.schema import Cohort


def split_patients(cohort: Cohort, test_fraction: float, seed: int) -> tuple[Cohort, Cohort]:
    """Return (train, test) cohorts; the same cohort, fraction and seed always give the same split.

    Within each event stratum round(test_fraction * n) patients go to test, clamped so that a
    stratum with at least two patients puts one on each side. Patients are ordered by id before
    shuffling, so reordering the rows of cohort.csv does not change the split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(cohort) < 2:
        raise ValueError(f"cannot split a cohort of {len(cohort)} patient(s) into train and test")
    rng = np.random.default_rng(seed)
    test_ids: set[str] = set()
    for event in (0, 1):
        ids = sorted(p.patient_id for p in cohort.patients if p.event == event)
        if not ids:
            continue
        n_test = int(np.floor(test_fraction * len(ids) + 0.5))
        if len(ids) >= 2:
            n_test = min(max(n_test, 1), len(ids) - 1)
        test_ids.update(ids[i] for i in rng.permutation(len(ids))[:n_test])
    if not test_ids or len(test_ids) == len(cohort):
        # Only when each stratum holds a single patient: rounding sent both to one side.
        ids = sorted(p.patient_id for p in cohort.patients)
        test_ids = {ids[int(rng.integers(len(ids)))]}
    train = tuple(p for p in cohort.patients if p.patient_id not in test_ids)
    test = tuple(p for p in cohort.patients if p.patient_id in test_ids)
    return Cohort(cohort.site_dir, train), Cohort(cohort.site_dir, test)
