"""Federation-wide report built only from the sites' aggregate summaries (no patient data reaches here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.report import figures
from fahr_core.report.html import esc, figure, fmt, fmt_p, kv_table, notes_list, page, table
from fahr_core.report.site import c_index_sentences, plain
from fahr_core.survival.metrics import MIN_CENSORING_SURVIVAL
from fahr_core.survival.pooling import pooled_hazard_ratio, weighted_c_index
from fahr_core.workdir import REPORT_PAGE, REPORT_SUMMARY


def _pooled(ratios: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The pooled HR (JSON) of HR fields of the site summaries, any of them missing or damaged."""
    pooled = pooled_hazard_ratio(
        (r.get("hr"), r.get("ci_low"), r.get("ci_high")) for r in ratios if isinstance(r, dict)
    )
    return None if pooled is None else pooled.to_json()


def _ci_text(ci: Sequence[float | None] | None) -> str:
    return f"{fmt(ci[0])}\u2013{fmt(ci[1])}" if ci else "\u2014"


def _hr_cell(hr: dict[str, Any] | None) -> str:
    if not hr or hr.get("hr") is None:
        return "\u2014"
    return f"{fmt(hr['hr'])} ({_ci_text([hr.get('ci_low'), hr.get('ci_high')])})"


def _site_row(s: dict[str, Any]) -> tuple[Any, ...]:
    epsilon = (s.get("privacy") or {}).get("epsilon")
    return (
        s.get("site", "?"),
        s.get("n", "\u2014"),
        s.get("events", "\u2014"),
        fmt(s.get("c_index")),
        _ci_text(s.get("c_index_ci")),
        fmt(s.get("uno_c")),
        _hr_cell(s.get("hr_top_vs_bottom")),
        _hr_cell(s.get("hr_per_sd_adjusted")),
        fmt_p(s.get("logrank_p")),
        fmt(epsilon) if isinstance(epsilon, int | float) else "\u2014",
    )


def _fad_rows(sites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each site's face-age deviation results, flattened (site, hr, r, r_ci, lr_p, similarity)."""
    rows = []
    for s in sites:
        fad = s.get("fad") or {}
        rows.append(
            {
                "site": str(s.get("site", "?")),
                "hr": fad.get("hr_per_decade"),
                "r": (fad.get("correlation") or {}).get("pearson"),
                "r_ci": (fad.get("correlation") or {}).get("pearson_ci"),
                "lr_p": (((fad.get("joint") or {}).get("lr_test") or {}).get("fad") or {}).get("p"),
                "similarity": (s.get("saliency") or {}).get("similarity"),
            }
        )
    return rows


def _fad_section(g: dict[str, Any], fad_forest: bytes | None) -> list[str]:
    """FAD across sites: per-site table, forest plot of the HR per decade, pooled HR (if any sent FAD)."""
    rows = _fad_rows(g["sites"])
    if not any(r["hr"] or r["r"] is not None for r in rows):
        return []
    parts = [
        "<h2>Face-age deviation by site</h2>",
        "<p>Each site computed face-age deviation (FAD: the age model's reading of the face minus the "
        "recorded age) with the same age model and sent these aggregates only.</p>",
        table(
            (
                "Site",
                "HR per decade of FAD, age+sex adjusted (95% CI)",
                "FAD vs risk score r (95% CI)",
                "What FAD adds to the risk score (LR p)",
                "Saliency maps r",
            ),
            [
                (
                    r["site"],
                    _hr_cell(r["hr"]),
                    f"{fmt(r['r'])} ({_ci_text(r['r_ci'])})",
                    fmt_p(r["lr_p"]),
                    fmt(r["similarity"]),
                )
                for r in rows
            ],
        ),
        figure(
            fad_forest,
            "Forest plot of the age- and sex-adjusted hazard ratio per decade of face-age deviation by site "
            "(log scale)",
            "Each square is one site's hazard ratio per decade of FAD with its 95% confidence interval; "
            "the red diamond pools the sites (fixed effect). Right of the dashed line at 1: looking older "
            "than one's age goes with a higher death rate at that site, beyond age and sex.",
            "No forest plot: no site reported a FAD hazard ratio.",
        ),
    ]
    pooled = g["fad_hr_per_decade_pooled"]
    if pooled is not None:
        parts.append(
            f"<p>Pooled HR per decade of FAD: {fmt(pooled['hr'])} "
            f"(95% CI {_ci_text([pooled['ci_low'], pooled['ci_high']])}) over {pooled['n_sites']} site(s); "
            f"I\u00b2 = {fmt(100 * pooled['i2'], 0)}%.</p>"
        )
    return parts


def _render(
    g: dict[str, Any], c_forest: bytes | None, hr_forest: bytes | None, fad_forest: bytes | None = None
) -> str:
    pooled = g["hr_per_sd_adjusted_pooled"]
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
                "Uno's C",
                "HR Q4 vs Q1 (95% CI)",
                "HR per SD, age+sex adjusted (95% CI)",
                "Log-rank p",
                "\u03b5 spent",
            ),
            [_site_row(s) for s in g["sites"]],
        ),
        "<p>Uno's C reweights pairs for each site's censoring and counts only deaths before one fixed time, "
        "tau: the model's horizon at every site, or, at a site where fewer than "
        f"{MIN_CENSORING_SURVIVAL:.0%} of patients were still under follow-up by then, the last whole year "
        "where enough were; that site's own report names its tau. Compare sites' Uno's C at the same "
        "tau.</p>",
        "<h2>C-index by site</h2>",
        figure(
            c_forest,
            "Forest plot of the C-index by site",
            "Each square is one site's C-index with its 95% confidence interval as a line; the red diamond "
            "is the patient-weighted mean. The dashed line at 0.5 is a coin toss: sites whose line lies "
            "wholly to the right ranked patients better than chance.",
            "No forest plot: no site summaries were received.",
        ),
        "<h2>Adjusted hazard ratio per SD of the risk score, by site</h2>",
        figure(
            hr_forest,
            "Forest plot of the age- and sex-adjusted hazard ratio per SD of the risk score by site "
            "(log scale)",
            "Each square is one site's hazard ratio per standard deviation of the risk score, adjusted for "
            "age and sex, with its 95% confidence interval; the red diamond pools the sites. The axis is "
            "logarithmic so that halving and doubling the death rate sit equally far from the dashed line "
            "at 1 (no effect). Sites to the right of 1 found the score predicts death beyond age and sex.",
            "No forest plot: no site summaries were received.",
        ),
    ]
    if pooled is not None:
        parts.append(
            f"<p>Pooled (fixed-effect, inverse-variance) adjusted HR per SD: {fmt(pooled['hr'])} "
            f"(95% CI {_ci_text([pooled['ci_low'], pooled['ci_high']])}) over {pooled['n_sites']} site(s); "
            f"I\u00b2 = {fmt(100 * pooled['i2'], 0)}% of the spread between sites exceeds chance.</p>"
        )
    parts += _fad_section(g, fad_forest)
    site_notes = [f"Site {s.get('site', '?')}: {n}" for s in g["sites"] for n in s.get("notes", [])]
    parts += [
        "<h2>Model and data</h2>",
        kv_table(g["meta"]),
        "<h2>Notes</h2>",
        notes_list(g["notes"] + site_notes),
    ]
    return page("fahr federated validation", "\n".join(parts))


def _forest_rows(sites: list[dict[str, Any]], key: str) -> list[tuple[str, float | None, list | None]]:
    """(site, estimate, [lo, hi]) for an HR field of the site summaries; missing fields give None."""
    rows = []
    for s in sites:
        hr = s.get(key) or {}
        ci = [hr.get("ci_low"), hr.get("ci_high")] if hr.get("ci_low") is not None else None
        rows.append((str(s.get("site", "?")), hr.get("hr"), ci))
    return rows


def write_federation_report(
    out_dir: Path, summaries: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the global ``summary.json`` and ``report.html`` from site summaries; returns the global summary.

    Reads only the sites' aggregate fields. Sites whose C-index is None stay in the table and plots but
    are excluded from the weighted mean; sites lacking the adjusted HR per SD (older summaries, or no age
    and sex supplied) are shown as "not reported" in its forest plot and left out of the pooled HR.
    """
    sites = [plain(s) for s in summaries]
    weighted = weighted_c_index((s.get("n", 0), s.get("c_index")) for s in sites)
    notes = [
        f"Site {s.get('site', '?')} has no C-index and is left out of the weighted mean."
        for s in sites
        if s.get("c_index") is None
    ]
    notes += [
        f"Site {s.get('site', '?')} reports no age- and sex-adjusted hazard ratio per SD; it is left out of "
        "the pooled hazard ratio."
        for s in sites
        if not (s.get("hr_per_sd_adjusted") or {}).get("hr")
    ]
    if not sites:
        notes.append("No site summaries were received, so there is nothing to compare.")
    summary = {
        "n_sites": len(sites),
        "n_total": sum(int(s.get("n", 0)) for s in sites),
        "events_total": sum(int(s.get("events", 0)) for s in sites),
        "c_index_weighted_mean": weighted.mean,
        "c_index_weighted_n": weighted.n,
        "hr_per_sd_adjusted_pooled": _pooled([s.get("hr_per_sd_adjusted") for s in sites]),
        "fad_hr_per_decade_pooled": _pooled([r["hr"] for r in _fad_rows(sites)]),
        "sites": sites,
        "meta": plain(meta),
        "notes": notes,
    }
    c_forest = hr_forest = fad_forest = None
    if sites:
        rows = [(str(s.get("site", "?")), s.get("c_index"), s.get("c_index_ci")) for s in sites]
        c_forest = figures.forest_png(rows, weighted.mean)
        pooled = summary["hr_per_sd_adjusted_pooled"]
        hr_forest = figures.forest_png(
            _forest_rows(sites, "hr_per_sd_adjusted"),
            pooled["hr"] if pooled else None,
            xlabel="Hazard ratio per SD of risk score, adjusted for age and sex (log scale)",
            reference=1.0,
            log_scale=True,
            pooled_label="Pooled (fixed effect)",
            missing_text="not reported",
        )
    fad_pooled = summary["fad_hr_per_decade_pooled"]
    if fad_pooled is not None:
        fad_forest = figures.forest_png(
            _forest_rows(_fad_rows(sites), "hr"),
            fad_pooled["hr"],
            xlabel="Hazard ratio per decade of face-age deviation, adjusted for age and sex (log scale)",
            reference=1.0,
            log_scale=True,
            pooled_label="Pooled (fixed effect)",
            missing_text="not reported",
        )
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / REPORT_PAGE, _render(summary, c_forest, hr_forest, fad_forest))
    atomic_write_json(out_dir / REPORT_SUMMARY, summary)
    return summary
