"""Patient-level train/test split: each patient's side is a hash of (split seed, patient id).

Splitting by patient (never by photo) keeps a patient's photos on one side, so test scores are
not inflated by near-duplicate faces.

Why a per-patient hash and not a shuffle: a permutation of the sorted ids depends on every id, so
enrolling one new patient moved about a third of the test set into training, and a model already
trained on them would then be validated on others' former test patients. Here a patient's side
depends only on the seed, their own id and the test fraction: enrolment, withdrawals, outcome
updates (a censored patient who later dies) and photo quality control never move anyone else.
The price is that the test share and the deaths in it vary binomially around the target instead
of being fixed, which only matters for very small sites (whose held-out metrics the report
already flags as too uncertain).
"""

from __future__ import annotations

import hashlib

from fahr_core.cohort.schema import Cohort

_DOMAIN = b"fahr-split-v1"  # versioned so a future change of rule cannot silently reuse old draws


def split_draw(patient_id: str, seed: int) -> float:
    """The patient's uniform draw in [0, 1): the first 8 bytes of sha256(domain, seed, id)."""
    digest = hashlib.sha256(b"\0".join((_DOMAIN, str(int(seed)).encode(), patient_id.encode("utf-8"))))
    return int.from_bytes(digest.digest()[:8], "big") / 2.0**64


def split_patients(cohort: Cohort, test_fraction: float, seed: int) -> tuple[Cohort, Cohort]:
    """Return (train, test) cohorts: a patient is in test when `split_draw(id, seed) < test_fraction`.

    The same id, seed and fraction always give the same side, whatever else is in the cohort and in
    whatever order cohort.csv lists it. Raising the fraction only moves patients from train to test.
    A small cohort can leave one side empty; the caller decides what that means.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    in_test = {p.patient_id: split_draw(p.patient_id, seed) < test_fraction for p in cohort.patients}
    train = tuple(p for p in cohort.patients if not in_test[p.patient_id])
    test = tuple(p for p in cohort.patients if in_test[p.patient_id])
    return Cohort(cohort.site_dir, train), Cohort(cohort.site_dir, test)
