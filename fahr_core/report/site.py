"""Per-site validation report: ``summary.json`` (aggregates only, sent to the server) and ``report.html``.

Per-patient values never leave the site: the summary carries aggregate numbers only, and the HTML page
shows quartile survival curves, never individual records.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.report import figures
from fahr_core.report.html import esc, fmt, img_png, kv_table, notes_list, p_phrase, page, table
from fahr_core.survival.metrics import (
    as_arrays,
    evaluate,
    km_by_quartile,
    quartile_skip_reason,
    risk_quartiles,
)


def plain(obj: Any) -> Any:
    """JSON-safe copy of caller-supplied metadata: numpy scalars to Python, nan/inf to None, tuples to lists.

    numpy arrays are refused: in a summary they would almost certainly be per-patient data.
    """
    if isinstance(obj, np.ndarray):
        raise TypeError("numpy arrays are not allowed in a report summary (per-patient data must stay local)")
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def c_index_sentences(c: float | None, ci: list[float] | None) -> str:
    """Plain-language reading of a C-index and its CI, for clinicians; shared with the federation report."""
    if c is None:
        return "The C-index could not be computed for this cohort; see the notes below."
    text = (
        f"Among pairs of patients where we know who died first, the model gave the higher risk to the "
        f"patient who died first in {100 * c:.0f}% of pairs. A coin toss would score 50%; a perfect "
        f"ordering 100%."
    )
    if ci is None:
        return text
    if ci[0] > 0.5:
        return text + " The whole 95% interval lies above 0.5: the ordering is better than chance."
    if ci[1] < 0.5:
        return text + " The whole 95% interval lies below 0.5: worse than chance; check for a data error."
    return text + " The 95% interval includes 0.5, so these data cannot show the ordering beats chance."


def _render(s: dict[str, Any], km_png: bytes | None) -> str:
    ci = s["c_index_ci"]
    ci_text = f" (95% CI {fmt(ci[0])}\u2013{fmt(ci[1])})" if ci else ""
    parts = [
        f"<h1>Validation report \u2014 site {esc(s['site'])}</h1>",
        f'<p class="headline">C-index {fmt(s["c_index"])}{esc(ci_text)}</p>',
        f"<p>{esc(c_index_sentences(s['c_index'], ci))}</p>",
        "<h2>Cohort</h2>",
        table(
            ("Patients", "Deaths", "Median follow-up (years, reverse Kaplan-Meier)"),
            [(s["n"], s["events"], fmt(s["median_follow_up"], 1))],
        ),
        "<h2>Survival by risk quartile</h2>",
    ]
    if km_png is not None:
        parts.append(img_png(km_png, "Kaplan-Meier by risk quartile"))
    else:
        parts.append("<p>Kaplan-Meier curves are not shown; the reason is in the notes below.</p>")
    parts.append(f"<p>Log-rank test (same survival in all four quartiles): {p_phrase(s['logrank_p'])}</p>")
    hr = s["hr_top_vs_bottom"]
    if hr is not None:
        hr_ci = f"{fmt(hr['ci_low'])}\u2013{fmt(hr['ci_high'])}"
        parts.append(
            f"<p>Patients in the highest risk quartile died at {fmt(hr['hr'])} times the rate of those "
            f"in the lowest quartile (Cox hazard ratio, 95% CI {hr_ci}, {p_phrase(hr['p'])}, "
            f"{hr['n']} patients).</p>"
        )
    else:
        parts.append("<p>Hazard ratio (highest vs lowest quartile): not computed; see the notes below.</p>")
    parts += [
        "<h2>Privacy spent</h2>",
        kv_table(s["privacy"]),
        "<h2>Model and data</h2>",
        kv_table(s["meta"]),
        "<h2>Notes</h2>",
        notes_list(s["notes"]),
    ]
    return page(f"fahr validation \u2014 {s['site']}", "\n".join(parts))


def write_site_report(
    out_dir: Path,
    site: str,
    time: Any,
    event: Any,
    risk: Any,
    privacy: dict[str, Any],
    meta: dict[str, Any],
    n_boot: int = 200,
) -> dict[str, Any]:
    """Evaluate one site's risk scores and write ``summary.json`` and ``report.html`` into ``out_dir``.

    Returns the summary dict exactly as written. summary.json is written last, so its presence means
    the report is complete.
    """
    time, event, risk = as_arrays(time, event, risk)
    ev = evaluate(time, event, risk, n_boot=n_boot)
    summary = {
        "site": str(site),
        "n": ev["n"],
        "events": ev["events"],
        "median_follow_up": ev["median_follow_up"],
        "c_index": ev["c_index"],
        "c_index_ci": ev["c_index_ci"],
        "hr_top_vs_bottom": ev["hr_top_vs_bottom"],
        "logrank_p": ev["logrank_p"],
        "privacy": plain(privacy),
        "meta": plain(meta),
        "notes": ev["notes"],
    }
    km_png = None
    if quartile_skip_reason(ev["n"], ev["events"]) is None:
        km_png = figures.km_quartiles_png(km_by_quartile(time, event, risk_quartiles(risk)))
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.html", _render(summary, km_png))
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
