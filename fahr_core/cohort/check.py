"""Everything `fahr-client start` will need, checked at once: config files, cohort, every photo.

A site operator fixes a site in one pass only if one run lists every problem, so nothing here
stops at the first one. Problems block (`check` exits 1, `start` does not join); warnings are
printed and the site may proceed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fahr_core.cohort.schema import Cohort, CohortError, load_cohort
from fahr_core.cohort.split import split_patients
from fahr_core.config import SiteConfig, is_set, site_config_warnings
from fahr_core.faces.detect import INSIGHTFACE_FILES
from fahr_core.faces.errors import PhotoError
from fahr_core.faces.photofile import read_photo_bytes
from fahr_core.faces.qc import verify_photo


@dataclass
class SiteCheck:
    """The outcome of `check_site`; `cohort` is None when cohort.csv itself is broken."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cohort: Cohort | None = None


def _config_files(cfg: SiteConfig, source: str) -> list[str]:
    """Files site.toml names that must exist (the TLS files only matter without --insecure)."""
    problems = []
    for key in ("root_certificates", "auth_key"):
        path = getattr(cfg.connection, key)
        if is_set(path) and not path.is_file():
            problems.append(f"{source}: [connection].{key} {path} not found")
    if cfg.alignment.detector == "insightface":
        for name in INSIGHTFACE_FILES:
            if not (cfg.alignment.model_dir / name).is_file():
                problems.append(
                    f"{source}: [alignment].model_dir {cfg.alignment.model_dir} lacks {name} "
                    "(copy it from InsightFace's buffalo_l pack; docs/alignment.md)"
                )
    return problems


def _photos(cohort: Cohort) -> tuple[list[str], list[str]]:
    """Each photo's size, format and integrity, and faces shared between patients (by content)."""
    problems: list[str] = []
    warnings: list[str] = []
    seen: dict[str, tuple[Path, str]] = {}
    for patient in cohort.patients:
        for photo in patient.photos:
            name = str(photo.relative_to(cohort.site_dir))
            try:
                data = read_photo_bytes(photo)
                verify_photo(data, name)
            except PhotoError as e:
                problems.append(f"photo {e}")
                continue
            digest = hashlib.sha256(data).hexdigest()
            first, owner = seen.setdefault(digest, (photo, patient.patient_id))
            if first == photo:
                continue
            earlier = first.relative_to(cohort.site_dir)
            if owner != patient.patient_id:
                problems.append(
                    f"photo {name} (patient {patient.patient_id}) has the same content as {earlier} "
                    f"(patient {owner}): one face cannot belong to two patients; fix cohort.csv"
                )
            else:
                warnings.append(f"photo {name} is a copy of {earlier} (both patient {owner}); keep one")
    return problems, warnings


def _trainable(cohort: Cohort, cfg: SiteConfig, source: str) -> list[str]:
    """A cohort that cannot be split into two non-empty parts, has no events, or makes delta void DP."""
    if len(cohort) < 2:
        return [f"cohort.csv: {len(cohort)} patient(s); a site needs at least 2 (a training and a test part)"]
    problems = []
    if not cohort.event.any():
        problems.append("cohort.csv: no patient has event = 1; survival training needs deaths")
    train, test = split_patients(cohort, cfg.test_fraction, cfg.split_seed)
    n_train = len(train)
    if not n_train or not len(test):
        problems.append(
            f"{source}: [site].test_fraction = {cfg.test_fraction:g} splits the {len(cohort)} patients into "
            f"{n_train} for training and {len(test)} for testing; both need patients (add patients or "
            "change test_fraction)"
        )
    delta = cfg.privacy.delta
    if delta > 0 and n_train and delta >= 1.0 / n_train:
        problems.append(
            f"{source}: [privacy].delta = {delta:g} is not below 1/n = 1/{n_train} of the training "
            "split, so DP protects nobody; set 0 (automatic) or a smaller value"
        )
    return problems


def check_site(cfg: SiteConfig, source: str) -> SiteCheck:
    """Every problem with a loaded site config's files, cohort.csv and photos (see the module doc)."""
    out = SiteCheck(problems=_config_files(cfg, source), warnings=site_config_warnings(cfg))
    try:
        out.cohort = load_cohort(cfg.data)
    except CohortError as e:
        out.problems += e.problems
        return out
    photo_problems, photo_warnings = _photos(out.cohort)
    out.problems += photo_problems + _trainable(out.cohort, cfg, source)
    out.warnings += photo_warnings
    return out
