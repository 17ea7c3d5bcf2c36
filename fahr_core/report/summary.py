"""What a site's ``summary.json`` holds, and what the site report is made from.

:class:`SiteSummary` is aggregates only: the file stays at the site, and its fields marked ``wire`` in
:mod:`fahr_core.survival.results` are what goes to the server (:mod:`fahr_core.protocol.wire`).
:class:`PatientScores` and :class:`SiteContext` are the report's inputs: the first per patient (it never
leaves the site, and nothing of it enters the summary but through the statistics), the second the
site's own description of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fahr_core.survival.results import FLATTEN, FADAnalysis, JsonResult, SiteEvaluation, wire


@dataclass(frozen=True)
class PatientScores:
    """One site's held-out patients: outcomes, the model's risk scores and, where known, more.

    ``age`` (years) and ``male`` (0/1) enable the cohort description and the age- and sex-adjusted
    hazard ratios; ``surv_pred`` ({horizon in years: predicted S(horizon) per patient}) enables
    calibration; ``fad`` (face-age deviation per patient, years; needs ``age``) the FAD analysis.
    """

    time: Any
    event: Any
    risk: Any
    age: np.ndarray | None = None
    male: np.ndarray | None = None
    surv_pred: Mapping[float, np.ndarray] | None = None
    fad: np.ndarray | None = None


@dataclass(frozen=True)
class SiteContext:
    """What the site says about the run beside the statistics (all of it aggregate or configuration).

    ``privacy``: the ledger's account; ``meta``: model and data versions; ``horizon``: the model's
    horizon in years, where Uno's C is truncated at every site; ``qc``: the face-alignment QC counts;
    ``age_model``: what produced the face ages (e.g. its sha256), required with FAD.
    """

    site: str
    privacy: Mapping[str, Any]
    meta: Mapping[str, Any]
    horizon: float | None = None
    qc: Mapping[str, Any] | None = None
    age_model: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SaliencySummary(JsonResult):
    """What the summary keeps of the mean saliency maps: how they were made and how alike they are."""

    method: str
    n_faces: int
    models: tuple[str, ...]
    similarity: float | None = field(default=None, metadata=wire("saliency-similarity"))


@dataclass(frozen=True)
class SiteSummary(JsonResult):
    """``summary.json``: the evaluation's fields at the top level, then the sections around them.

    ``notes`` gathers the notes of every statistic, so the report lists them once.
    """

    site: str
    evaluation: SiteEvaluation = field(metadata={FLATTEN: True})
    fad: FADAnalysis | None
    saliency: SaliencySummary | None
    alignment_qc: Mapping[str, Any] | None
    privacy: Mapping[str, Any]
    meta: Mapping[str, Any]
    notes: tuple[str, ...]
