"""What the survival statistics return: frozen result objects that write themselves as JSON.

Like lifelines' fitters, the statistics return objects, not dicts, so a reader (and the type checker)
sees which fields exist and a renderer cannot misspell one. ``to_json()`` gives exactly the JSON the site
summary holds: field names are the JSON keys, tuples become lists, nested results nest.

Field metadata says two more things about a field:

- ``LOCAL``: kept out of the JSON. Every result carries the ``notes`` explaining its gaps; the site summary
  gathers them into its one list of notes, so a section does not repeat them.
- ``metadata=wire(key)``: the field is one of the aggregates a site sends the server, under this metric
  name. The mapping in :mod:`fahr_core.protocol.wire` is generated from these marks, and every name must
  be on the outbound allow-list (tests/test_wire.py checks both ways). A number goes as itself, a
  ``(low, high)`` interval as ``key-low``/``key-high``, and a result type with ``WIRE_PARTS`` as those of
  its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

LOCAL: Mapping[str, Any] = {"local": True}
OMIT_NONE = "omit_none"  # metadata: the key is absent from the JSON when the value is None
FLATTEN = "flatten"  # metadata: a nested result whose fields sit at this level of the JSON
WIRE = "wire"  # metadata: the metric name the field travels under


def wire(key: str) -> Mapping[str, Any]:
    """Field metadata: the field is sent to the server as metric ``key`` (see the module docstring)."""
    return {WIRE: key}


def as_json(value: Any) -> Any:
    """The JSON form of a result value: results via ``to_json``, tuples as lists, mappings recursively."""
    if isinstance(value, JsonResult):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_json(v) for k, v in value.items()}
    return value


class JsonResult:
    """Base of every result: ``to_json()`` walks the dataclass fields (see the module docstring)."""

    def to_json(self) -> dict[str, Any]:
        assert is_dataclass(self)
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("local") or (value is None and f.metadata.get(OMIT_NONE)):
                continue
            if f.metadata.get(FLATTEN):
                out.update(value.to_json())
            else:
                out[f.name] = as_json(value)
        return out


def _optional() -> Any:
    return field(default=None, metadata={OMIT_NONE: True})


@dataclass(frozen=True)
class HazardRatio(JsonResult):
    """A Cox hazard ratio with its 95% CI and Wald p.

    ``n`` and ``adjusted_for`` say which patients and covariates the model had; ``sd`` is the SD of the
    risk score a per-SD ratio is per. A term read off a bigger model (the joint FAD model's risk score)
    has none of the three, and they are then absent from the JSON, as they always were.
    """

    WIRE_PARTS: ClassVar[Mapping[str, str]] = {"hr": "", "ci_low": "-low", "ci_high": "-high"}

    hr: float | None
    ci_low: float | None
    ci_high: float | None
    p: float | None
    n: int | None = _optional()
    adjusted_for: tuple[str, ...] | None = _optional()
    sd: float | None = _optional()


@dataclass(frozen=True)
class ProportionalHazardsTest(JsonResult):
    """Schoenfeld-residual test of proportional hazards: p per covariate, rank time transform."""

    time_transform: str
    p: Mapping[str, float | None]
    risk_score_violates: bool | None


@dataclass(frozen=True)
class TimeAUC(JsonResult):
    """Cumulative/dynamic AUC at one horizon (None: not computable, the reason is in the notes)."""

    years: float
    auc: float | None


@dataclass(frozen=True)
class CalibrationBin(JsonResult):
    """One bin of patients with similar predicted survival: mean prediction vs Kaplan-Meier observation."""

    n: int
    predicted: float
    observed: float | None  # None: no patient of the bin was followed to the horizon
    observed_ci: tuple[float | None, float | None] | None


@dataclass(frozen=True)
class CalibrationAtHorizon(JsonResult):
    years: float
    bins: tuple[CalibrationBin, ...]
    mean_abs_diff: float | None


@dataclass(frozen=True)
class Calibration(JsonResult):
    """Predicted vs observed survival per horizon, and the mean absolute difference over horizons."""

    horizons: tuple[CalibrationAtHorizon, ...]
    mean_abs_diff: float | None
    notes: tuple[str, ...] = field(default=(), metadata=LOCAL)


@dataclass(frozen=True)
class AgeSummary(JsonResult):
    """Age mean, SD and quartiles: not min/max, which would be two real patients' exact ages."""

    mean: float
    sd: float | None
    q1: float
    q3: float


@dataclass(frozen=True)
class AdjustedHazardRatios(JsonResult):
    """The two Cox models of the risk score (see ``metrics.adjusted_hazard_ratios``)."""

    top_vs_bottom: HazardRatio | None = None
    per_sd: HazardRatio | None = None
    ph_test: ProportionalHazardsTest | None = None
    notes: tuple[str, ...] = field(default=(), metadata=LOCAL)


@dataclass(frozen=True)
class SiteEvaluation(JsonResult):
    """Every statistic of one cohort's risk scores (see ``metrics.evaluate``); None where not computed."""

    n: int = field(metadata=wire("num-examples"))
    events: int = field(metadata=wire("events"))
    median_follow_up: float | None = None
    age: AgeSummary | None = None
    male_percent: float | None = None
    c_index: float | None = field(default=None, metadata=wire("c-index"))
    c_index_ci: tuple[float, float] | None = field(default=None, metadata=wire("c-index"))
    uno_c: float | None = field(default=None, metadata=wire("uno-c"))
    uno_c_ci: tuple[float, float] | None = field(default=None, metadata=wire("uno-c"))
    uno_c_tau: float | None = None
    uno_c_horizon: float | None = None
    td_auc: tuple[TimeAUC, ...] = ()
    logrank_p: float | None = field(default=None, metadata=wire("logrank-p"))
    hr_top_vs_bottom: HazardRatio | None = field(default=None, metadata=wire("hr-top-bottom"))
    hr_per_sd: HazardRatio | None = None
    hr_top_vs_bottom_adjusted: HazardRatio | None = None
    hr_per_sd_adjusted: HazardRatio | None = field(default=None, metadata=wire("hr-sd-adj"))
    ph_test: ProportionalHazardsTest | None = None
    calibration: Calibration | None = None
    notes: tuple[str, ...] = field(default=(), metadata=LOCAL)


@dataclass(frozen=True)
class Correlation(JsonResult):
    """Pearson r (Fisher-z 95% CI) and Spearman's rho of FAD with the risk score, and the alarm."""

    pearson: float = field(metadata=wire("fad-risk-r"))
    pearson_ci: tuple[float, float] = field(metadata=wire("fad-risk-r"))
    pearson_p: float | None
    spearman: float | None
    spearman_p: float | None
    alarm_threshold: float
    redundancy_alarm: bool


@dataclass(frozen=True)
class LRTest(JsonResult):
    """Likelihood-ratio test of one added covariate (chi-squared on ``df`` degrees of freedom)."""

    WIRE_PARTS: ClassVar[Mapping[str, str]] = {"p": ""}

    chi2: float
    df: int
    p: float | None


@dataclass(frozen=True)
class LRTests(JsonResult):
    fad: LRTest = field(metadata=wire("fad-lr-p"))  # what FAD adds to the risk score (and age, sex)
    risk: LRTest = field(metadata=wire("risk-lr-p"))  # what the risk score adds to FAD (and age, sex)


@dataclass(frozen=True)
class JointModel(JsonResult):
    """One Cox model with FAD and the risk score together (plus age and sex)."""

    fad_per_decade: HazardRatio
    risk_per_sd: HazardRatio
    adjusted_for: tuple[str, ...]
    lr_test: LRTests


@dataclass(frozen=True)
class FADAnalysis(JsonResult):
    """Face-age deviation's summary, adjusted HR, correlation with the risk score and joint model.

    ``age_model`` describes the model that read the faces (e.g. its sha256); ``fad_statistics`` does not
    know it, the site report adds it.
    """

    n: int
    mean: float | None = field(default=None, metadata=wire("fad-mean"))
    sd: float | None = None
    mean_abs: float | None = field(default=None, metadata=wire("fad-mean-abs"))
    hr_per_decade: HazardRatio | None = field(default=None, metadata=wire("fad-hr-decade"))
    correlation: Correlation | None = None
    joint: JointModel | None = None
    age_model: Mapping[str, Any] | None = _optional()
    notes: tuple[str, ...] = field(default=(), metadata=LOCAL)
