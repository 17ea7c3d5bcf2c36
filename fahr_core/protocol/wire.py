"""A site summary <-> the flat scalar metrics that carry it to the server.

Flower metric records hold flat numbers, so the aggregate fields of a site's summary.json are
sent as named scalars and rebuilt at the server. The mapping lives here once, for both ends.
A field may be a dotted path into a nested section of the summary (``fad.hr_per_decade``).
"""

from __future__ import annotations

from typing import Any

SCALARS = {
    "num-examples": "n",
    "events": "events",
    "c-index": "c_index",
    "uno-c": "uno_c",
    "logrank-p": "logrank_p",
    "fad-mean": "fad.mean",
    "fad-mean-abs": "fad.mean_abs",
    "fad-risk-r": "fad.correlation.pearson",
    "fad-lr-p": "fad.joint.lr_test.fad.p",  # what FAD adds to the risk score (and age, sex)
    "risk-lr-p": "fad.joint.lr_test.risk.p",  # what the risk score adds to FAD (and age, sex)
    "saliency-similarity": "saliency.similarity",
}
# metric prefix -> [low, high] field
INTERVALS = {"c-index": "c_index_ci", "uno-c": "uno_c_ci", "fad-risk-r": "fad.correlation.pearson_ci"}
RATIOS = {  # metric prefix -> {hr, ci_low, ci_high} field
    "hr-top-bottom": "hr_top_vs_bottom",
    "hr-sd-adj": "hr_per_sd_adjusted",
    "fad-hr-decade": "fad.hr_per_decade",
}


def _get(summary: dict[str, Any], field: str) -> Any:
    """The value at a dotted path, or None where any level is missing or None."""
    value: Any = summary
    for key in field.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _put(summary: dict[str, Any], field: str, value: Any) -> None:
    *parents, last = field.split(".")
    for key in parents:
        summary = summary.setdefault(key, {})
    summary[last] = value


def summary_to_metrics(summary: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of `summary` that go to the server (those that could be computed)."""
    out: dict[str, float | int] = {}
    for key, field in SCALARS.items():
        if _get(summary, field) is not None:
            out[key] = float(_get(summary, field))
    for key, field in INTERVALS.items():
        if _get(summary, field):
            out[f"{key}-low"], out[f"{key}-high"] = (float(v) for v in _get(summary, field))
    for key, field in RATIOS.items():
        ratio = _get(summary, field) or {}
        if ratio.get("hr") is not None:
            out[key] = float(ratio["hr"])
            for end in ("low", "high"):
                if ratio.get(f"ci_{end}") is not None:
                    out[f"{key}-{end}"] = float(ratio[f"ci_{end}"])
    epsilon = (summary.get("privacy") or {}).get("epsilon")
    if epsilon is not None:
        out["epsilon"] = float(epsilon)
    out["num-examples"] = int(summary.get("n", 0))
    return out


def metrics_to_summary(site: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the aggregate site summary the federation report reads from received metrics."""
    summary: dict[str, Any] = {"site": site}
    for key, field in SCALARS.items():
        _put(summary, field, metrics.get(key))
    summary["n"] = int(metrics.get("num-examples") or 0)
    summary["events"] = int(metrics.get("events") or 0)
    for key, field in INTERVALS.items():
        low, high = metrics.get(f"{key}-low"), metrics.get(f"{key}-high")
        _put(summary, field, [low, high] if low is not None and high is not None else None)
    for key, field in RATIOS.items():
        _put(
            summary,
            field,
            None
            if metrics.get(key) is None
            else {
                "hr": metrics[key],
                "ci_low": metrics.get(f"{key}-low"),
                "ci_high": metrics.get(f"{key}-high"),
            },
        )
    summary["privacy"] = {"epsilon": metrics.get("epsilon")}
    return summary
