"""A site summary <-> the flat scalar metrics that carry it to the server.

Flower metric records hold flat numbers, so the aggregate fields of a site's summary.json are
sent as named scalars and rebuilt at the server. The mapping lives here once, for both ends.
"""

from __future__ import annotations

from typing import Any

SCALARS = {
    "num-examples": "n",
    "events": "events",
    "c-index": "c_index",
    "uno-c": "uno_c",
    "logrank-p": "logrank_p",
}
INTERVALS = {"c-index": "c_index_ci", "uno-c": "uno_c_ci"}  # metric prefix -> [low, high] field
RATIOS = {"hr-top-bottom": "hr_top_vs_bottom", "hr-sd-adj": "hr_per_sd_adjusted"}  # -> {hr, ci_low, ci_high}

SUMMARY_METRICS = frozenset(
    [
        *SCALARS,
        *(f"{k}-{e}" for k in INTERVALS for e in ("low", "high")),
        *(f"{k}{e}" for k in RATIOS for e in ("", "-low", "-high")),
        "epsilon",
    ]
)


def summary_to_metrics(summary: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of `summary` that go to the server (those that could be computed)."""
    out: dict[str, float | int] = {}
    for key, field in SCALARS.items():
        if summary.get(field) is not None:
            out[key] = float(summary[field])
    for key, field in INTERVALS.items():
        if summary.get(field):
            out[f"{key}-low"], out[f"{key}-high"] = (float(v) for v in summary[field])
    for key, field in RATIOS.items():
        ratio = summary.get(field) or {}
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
        summary[field] = metrics.get(key)
    summary["n"] = int(metrics.get("num-examples") or 0)
    summary["events"] = int(metrics.get("events") or 0)
    for key, field in INTERVALS.items():
        low, high = metrics.get(f"{key}-low"), metrics.get(f"{key}-high")
        summary[field] = [low, high] if low is not None and high is not None else None
    for key, field in RATIOS.items():
        summary[field] = (
            None
            if metrics.get(key) is None
            else {
                "hr": metrics[key],
                "ci_low": metrics.get(f"{key}-low"),
                "ci_high": metrics.get(f"{key}-high"),
            }
        )
    summary["privacy"] = {"epsilon": metrics.get("epsilon")}
    return summary
