"""Federation-wide report built only from the sites' aggregate summaries (no patient data reaches here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.report import figures
from fahr_core.report.html import esc, fmt, fmt_p, img_png, kv_table, notes_list, page, table
from fahr_core.report.site import c_index_sentences, plain


def weighted_c_index(summaries: list[dict[str, Any]]) -> tuple[float | None, int]:
    """n-weighted mean of site C-indices over sites that have one, and the patients it covers.

    This is a summary of site results, not a C-index over all pooled patients: that would need
    per-patient data, which by design never leaves a site.
    """
    scored = [s for s in summaries if s.get("c_index") is not None and s.get("n", 0) > 0]
    n = sum(int(s["n"]) for s in scored)
    if n == 0:
        return None, 0
    return sum(int(s["n"]) * float(s["c_index"]) for s in scored) / n, n


def _ci_text(ci: list[float] | None) -> str:
    return f"{fmt(ci[0])}\u2013{fmt(ci[1])}" if ci else "\u2014"


def _site_row(s: dict[str, Any]) -> tuple[Any, ...]:
    hr = s.get("hr_top_vs_bottom")
    hr_text = f"{fmt(hr['hr'])} ({_ci_text([hr['ci_low'], hr['ci_high']])})" if hr else "\u2014"
    epsilon = (s.get("privacy") or {}).get("epsilon")
    return (
        s.get("site", "?"),
        s.get("n", "\u2014"),
        s.get("events", "\u2014"),
        fmt(s.get("c_index")),
        _ci_text(s.get("c_index_ci")),
        hr_text,
        fmt_p(s.get("logrank_p")),
        fmt(epsilon) if isinstance(epsilon, int | float) else "\u2014",
    )


def _render(g: dict[str, Any], forest: bytes | None) -> str:
    parts = [
        "<h1>Federated validation report</h1>",
        f'<p class="headline">n-weighted mean C-index {fmt(g["c_index_weighted_mean"])} '
        f"over {g['c_index_weighted_n']} patients at {g['n_sites']} site(s)</p>",
        f"<p>{esc(c_index_sentences(g['c_index_weighted_mean'], None))} The mean weights each site's "
        "C-index by its number of patients; it is not a C-index over pooled patients.</p>",
        "<h2>Sites</h2>",
        table(
            (
                "Site",
                "Patients",
                "Deaths",
                "C-index",
                "95% CI",
                "HR Q4 vs Q1 (95% CI)",
                "Log-rank p",
                "\u03b5 spent",
            ),
            [_site_row(s) for s in g["sites"]],
        ),
    ]
    if forest is not None:
        parts.append(img_png(forest, "C-index by site (forest plot)"))
    site_notes = [f"Site {s.get('site', '?')}: {n}" for s in g["sites"] for n in s.get("notes", [])]
    parts += [
        "<h2>Model and data</h2>",
        kv_table(g["meta"]),
        "<h2>Notes</h2>",
        notes_list(g["notes"] + site_notes),
    ]
    return page("fahr federated validation", "\n".join(parts))


def write_federation_report(
    out_dir: Path, summaries: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the global ``summary.json`` and ``report.html`` from site summaries; returns the global summary.

    Sites whose C-index is None stay in the table and plot but are excluded from the weighted mean.
    """
    sites = [plain(s) for s in summaries]
    mean, n_scored = weighted_c_index(sites)
    notes = [
        f"Site {s.get('site', '?')} has no C-index and is left out of the weighted mean."
        for s in sites
        if s.get("c_index") is None
    ]
    if not sites:
        notes.append("No site summaries were received, so there is nothing to compare.")
    summary = {
        "n_sites": len(sites),
        "n_total": sum(int(s.get("n", 0)) for s in sites),
        "events_total": sum(int(s.get("events", 0)) for s in sites),
        "c_index_weighted_mean": mean,
        "c_index_weighted_n": n_scored,
        "sites": sites,
        "meta": plain(meta),
        "notes": notes,
    }
    forest = None
    if sites:
        rows = [(str(s.get("site", "?")), s.get("c_index"), s.get("c_index_ci")) for s in sites]
        forest = figures.forest_png(rows, mean)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.html", _render(summary, forest))
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
