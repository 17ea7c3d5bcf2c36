"""Per-site validation report: ``summary.json`` (aggregates only, sent to the server) and ``report.html``.

Per-patient values never leave the site: the summary carries aggregate numbers only (calibration bins hold
at least 10 patients), and the HTML page shows quartile survival curves, never individual records.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fahr_core.io import atomic_write_json, atomic_write_text
from fahr_core.models.saliency import MIN_PATIENTS_FOR_SALIENCY, CohortSaliency
from fahr_core.report import figures
from fahr_core.report.html import esc, figure, fmt, kv_table, notes_list, p_phrase, page, table
from fahr_core.report.summary import PatientScores, SaliencySummary, SiteContext, SiteSummary
from fahr_core.survival.fad import REDUNDANCY_ALARM, fad_statistics
from fahr_core.survival.metrics import (
    MIN_CENSORING_SURVIVAL,
    as_arrays,
    evaluate,
    km_by_quartile,
    quartile_skip_reason,
    risk_quartiles,
)
from fahr_core.workdir import REPORT_PAGE, REPORT_SUMMARY


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


NA = "not available"


def _ci(lo: float | None, hi: float | None) -> str:
    return f"{fmt(lo)}\u2013{fmt(hi)}"


def _hr_text(hr: dict[str, Any] | None) -> str:
    """'2.61 (95% CI 2.40–2.86), p < 0.001' or 'not computed'."""
    if hr is None:
        return "not computed"
    return f"{fmt(hr['hr'])} (95% CI {_ci(hr['ci_low'], hr['ci_high'])}), {p_phrase(hr['p'])}"


def _cohort_table(s: dict[str, Any]) -> str:
    age = s["age"]
    age_mean = NA if age is None else f"{fmt(age['mean'], 1)} ({fmt(age['sd'], 1)})"
    age_iqr = NA if age is None else f"{fmt(age['q1'], 0)}\u2013{fmt(age['q3'], 0)}"
    male = NA if s["male_percent"] is None else f"{fmt(s['male_percent'], 1)}%"
    return table(
        (
            "Patients",
            "Deaths",
            "Median follow-up (years, reverse Kaplan-Meier)",
            "Age, mean (SD)",
            "Age, interquartile range",
            "Male",
        ),
        [(s["n"], s["events"], fmt(s["median_follow_up"], 1), age_mean, age_iqr, male)],
    )


def uno_tau_sentence(tau: float | None, horizon: float | None) -> str:
    """Which truncation time Uno's C used and why, for clinicians; empty when it was not computed."""
    if tau is None:
        return ""
    if horizon is None:
        return (
            f" It counts deaths within the first {tau:g} years (tau = {tau:g}, the last whole year at which "
            f"at least {MIN_CENSORING_SURVIVAL:.0%} of patients were still under follow-up; no model horizon "
            "was given)."
        )
    if tau >= horizon:
        return (
            f" It counts deaths within the first {tau:g} years (tau = {tau:g}, the model's horizon, the same "
            "at every site), so it can be compared with other sites' Uno's C."
        )
    return (
        f" It counts deaths within the first {tau:g} years only (tau = {tau:g}), not the model's horizon of "
        f"{horizon:g} years: beyond {tau:g} years fewer than {MIN_CENSORING_SURVIVAL:.0%} of this site's "
        "patients were still under follow-up, too few to reweight reliably. Compare it only with sites "
        f"whose tau is also {tau:g} years."
    )


def _discrimination(s: dict[str, Any]) -> list[str]:
    uno = s["uno_c"]
    uno_text = f"{fmt(uno)} (95% CI {_ci(*s['uno_c_ci'])})" if uno is not None and s["uno_c_ci"] else fmt(uno)
    rows = [(f"{t['years']:g}", fmt(t["auc"])) for t in s["td_auc"]]
    return [
        "<h2>Discrimination beyond Harrell's C</h2>",
        f"<p>Uno's C-index: {esc(uno_text)}."
        + esc(uno_tau_sentence(s["uno_c_tau"], s["uno_c_horizon"]))
        + " Harrell's C counts every pair whose order is known, so sites that follow patients longer or "
        "lose fewer to follow-up weigh late deaths more. Uno's C weights each pair by the chance of "
        "staying under follow-up until the earlier death, so it does not depend on this site's censoring "
        "pattern, and truncating at one fixed time makes sites with different follow-up comparable; a "
        "value close to Harrell's means censoring does not distort the headline.</p>",
        table(("Years", "Time-dependent AUC"), rows),
        "<p>The time-dependent AUC at <i>t</i> years is the chance that a patient who died within <i>t</i> "
        "years had a higher risk score than a patient still alive at <i>t</i> years (0.5 = chance, "
        "1 = perfect). A dash means it could not be computed; see the notes.</p>",
    ]


def _adjusted_label(s: dict[str, Any]) -> str | None:
    names = [n for n, present in (("age", s["age"]), ("sex", s["male_percent"])) if present is not None]
    return " and ".join(names) or None


def _hazard_ratios(s: dict[str, Any]) -> list[str]:
    adj = _adjusted_label(s)
    adj_header = f"Adjusted for {adj}" if adj else "Adjusted"
    sd = (s["hr_per_sd"] or s["hr_per_sd_adjusted"] or {}).get("sd")

    def adjusted(hr: dict[str, Any] | None) -> str:
        return _hr_text(hr) if adj else f"{NA} (age and sex not supplied)"

    parts = [
        "<h2>Hazard ratios</h2>",
        table(
            ("Comparison", "Unadjusted HR", adj_header + " HR"),
            [
                (
                    "Highest vs lowest risk quartile",
                    _hr_text(s["hr_top_vs_bottom"]),
                    adjusted(s["hr_top_vs_bottom_adjusted"]),
                ),
                (
                    f"Per standard deviation of the risk score (SD = {fmt(sd, 3)})",
                    _hr_text(s["hr_per_sd"]),
                    adjusted(s["hr_per_sd_adjusted"]),
                ),
            ],
        ),
    ]
    hr = s["hr_top_vs_bottom"]
    if hr is not None:
        parts.append(
            f"<p>Patients in the highest risk quartile died at {fmt(hr['hr'])} times the rate of those "
            f"in the lowest quartile (Cox hazard ratio, 95% CI {_ci(hr['ci_low'], hr['ci_high'])}, "
            f"{p_phrase(hr['p'])}, {hr['n']} patients).</p>"
        )
    else:
        parts.append("<p>Hazard ratio (highest vs lowest quartile): not computed; see the notes below.</p>")
    hr = s["hr_per_sd_adjusted"]
    if hr is not None:
        parts.append(
            f"<p>After accounting for {esc(adj)}, which a face also reveals and which predict death on "
            f"their own, each standard deviation higher risk score multiplied the death rate by "
            f"{fmt(hr['hr'])} (95% CI {_ci(hr['ci_low'], hr['ci_high'])}). A value above 1 whose interval "
            f"excludes 1 means the score adds information beyond {esc(adj)}.</p>"
        )
    ph = s["ph_test"]
    if ph is None:
        parts.append("<p>Proportional-hazards check: not computed; see the notes below.</p>")
    else:
        labels = {"risk_per_sd": "risk score", "age": "age", "male": "sex"}
        order = sorted(ph["p"], key=lambda k: k != "risk_per_sd")  # the risk score first
        ps = ", ".join(f"{labels.get(k, k)} {p_phrase(ph['p'][k])}" for k in order)
        parts.append(
            f"<p>Proportional-hazards check of the per-SD model (Schoenfeld residuals against ranked time): "
            f"{esc(ps)}. A p-value below 0.05 means that covariate's effect changes over follow-up, so its "
            "hazard ratio is an average over time.</p>"
        )
    return parts


def _calibration(s: dict[str, Any], cal_png: bytes | None) -> list[str]:
    cal = s["calibration"]
    parts = ["<h2>Calibration</h2>"]
    if cal is None:
        parts.append(
            "<p>Calibration is not assessed: the model's predicted survival probabilities were not "
            "supplied to this report.</p>"
        )
        return parts
    horizons = ", ".join(f"{h['years']:g}" for h in cal["horizons"])
    parts.append(
        figure(
            cal_png,
            f"Calibration plot: predicted versus observed survival at {horizons} year(s)",
            "Each dot is a group of patients with similar predicted survival. Across: the survival the "
            "model predicted, on average, for that group; up: the share of the group actually still alive "
            "(Kaplan-Meier, with its 95% confidence interval). Dots on the dashed diagonal mean the "
            "predictions were right; dots below it mean the model was too optimistic, above it too "
            "pessimistic.",
            "The calibration figure is not shown: no horizon had enough follow-up to observe survival; "
            "see the notes below.",
        )
    )
    rows = [(f"{h['years']:g}", fmt(_pct(h["mean_abs_diff"]), 1), len(h["bins"])) for h in cal["horizons"]]
    parts += [
        table(("Years", "Mean |predicted \u2212 observed| (percentage points)", "Bins"), rows),
        "<p>The mean absolute difference is weighted by the number of patients per bin: it says by how "
        "many percentage points, on average, predicted survival missed the observed survival.</p>",
    ]
    return parts


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _qc_table(qc: dict[str, Any] | None) -> str:
    """Alignment QC counts; nested dicts (e.g. rejection reasons) become one row each."""
    if qc is None:
        return f"<p>Alignment quality control: {NA}.</p>"
    rows = []
    for key, value in qc.items():
        if isinstance(value, dict):
            rows += [(f"{key}: {k}", v) for k, v in value.items()] or [(key, "none")]
        else:
            rows.append((key, value))
    return table(("Item", "Count"), rows)


def _lr_text(test: dict[str, Any]) -> str:
    return f"\u03c7\u00b2 = {fmt(test['chi2'])}, {p_phrase(test['p'])}"


def _fad_section(s: dict[str, Any]) -> list[str]:
    fad = s["fad"]
    parts = ["<h2>Face-age deviation</h2>"]
    if fad is None:
        return parts + [
            "<p>Face-age deviation (FAD) was not computed: no age model came with this evaluation (the "
            "server's [model].age_checkpoint is not set).</p>"
        ]
    model, hr, corr, joint = fad["age_model"], fad["hr_per_decade"], fad["correlation"], fad["joint"]
    adjusted = _adjusted_label(s) or "age"
    parts.append(
        f"<p>FAD is the age the federation's age model reads from a patient's face minus the patient's "
        f"recorded age: a positive FAD means the face looks older than the patient is. Age model "
        f"{esc(model['arch'])}, sha256 <code>{esc(model['sha256'])}</code>. Mean FAD {fmt(fad['mean'], 1)} "
        f"years (SD {fmt(fad['sd'], 1)}); mean absolute deviation {fmt(fad['mean_abs'], 1)} years, which is "
        "how far the model's reading is from the recorded age on average at this site.</p>"
    )
    corr_text = NA
    if corr is not None:
        corr_text = (
            f"{fmt(corr['pearson'])} (95% CI {_ci(*corr['pearson_ci'])}), {p_phrase(corr['pearson_p'])}; "
            f"Spearman's rho {fmt(corr['spearman'])}"
        )
    parts.append(
        table(
            ("Question", "Answer"),
            [
                (f"Hazard ratio per decade of FAD, adjusted for {adjusted}", _hr_text(hr)),
                ("Correlation of FAD with the survival risk score (Pearson r)", corr_text),
            ],
        )
    )
    if corr is not None:
        verdict = (
            f"Redundancy alarm: |r| is above {REDUNDANCY_ALARM:g}, so the survival model may mostly be "
            "reading how old faces look for their age; the joint model below says whether each still adds "
            "something."
            if corr["redundancy_alarm"]
            else f"|r| is below the redundancy alarm of {REDUNDANCY_ALARM:g}: the risk score is not a "
            "restatement of the face-age deviation."
        )
        parts.append(
            f'<p class="note">{esc(verdict)}</p>' if corr["redundancy_alarm"] else f"<p>{esc(verdict)}</p>"
        )
    if joint is not None:
        parts += [
            table(
                (
                    f"Term (one Cox model: FAD, risk score, {adjusted})",
                    "Hazard ratio",
                    "What it adds (LR test)",
                ),
                [
                    ("FAD, per decade", _hr_text(joint["fad_per_decade"]), _lr_text(joint["lr_test"]["fad"])),
                    (
                        "Risk score, per SD",
                        _hr_text(joint["risk_per_sd"]),
                        _lr_text(joint["lr_test"]["risk"]),
                    ),
                ],
            ),
            "<p>Each likelihood-ratio test compares the joint model with the same model without that term: "
            "a small p-value means the term predicts death beyond everything else in the model.</p>",
        ]
    return parts


def _saliency_section(s: dict[str, Any], png: bytes | None) -> list[str]:
    sal = s["saliency"]
    similarity = (
        ""
        if sal is None or sal["similarity"] is None
        else (
            f" The two maps correlate with r = {fmt(sal['similarity'])} (1: the models are sensitive to "
            "the same places in the same proportions; 0: unrelated places)."
        )
    )
    return [
        "<h2>Where the models look</h2>",
        figure(
            png,
            "Mean saliency maps of the models over the held-out patients' aligned faces",
            "Brighter means the model's output changes more when those pixels change (gradient times "
            f"input), averaged over {sal['n_faces'] if sal else 0} aligned faces and drawn on their average "
            "face; every face is aligned to the same template, so a place on the map is the same place on "
            f"every face.{similarity}",
            f"Saliency maps are not shown: they are drawn only for at least {MIN_PATIENTS_FOR_SALIENCY} "
            "held-out patients, because a mean over fewer faces would show individual patients.",
        ),
    ]


def _render(
    s: dict[str, Any], km_png: bytes | None, cal_png: bytes | None, saliency_png: bytes | None = None
) -> str:
    ci = s["c_index_ci"]
    ci_text = f" (95% CI {_ci(*ci)})" if ci else ""
    parts = [
        f"<h1>Validation report \u2014 site {esc(s['site'])}</h1>",
        f'<p class="headline">C-index (Harrell) {fmt(s["c_index"])}{esc(ci_text)}</p>',
        f"<p>{esc(c_index_sentences(s['c_index'], ci))}</p>",
        "<h2>Cohort</h2>",
        _cohort_table(s),
        *_discrimination(s),
        "<h2>Survival by risk quartile</h2>",
        figure(
            km_png,
            "Kaplan-Meier survival curves by risk quartile",
            "Each line follows one quarter of the patients, grouped by the model's risk score from lowest "
            "(blue) to highest (red), and shows the share still alive over the years of follow-up; shaded "
            "bands are 95% confidence intervals. The further apart the lines, the better the score "
            "separates patients with different outlooks.",
            "Kaplan-Meier curves by risk quartile are not shown; the reason is in the notes below.",
        ),
        f"<p>Log-rank test (same survival in all four quartiles): {p_phrase(s['logrank_p'])}</p>",
        *_hazard_ratios(s),
        *_calibration(s, cal_png),
        *_fad_section(s),
        *_saliency_section(s, saliency_png),
        "<h2>Face alignment quality control</h2>",
        _qc_table(s["alignment_qc"]),
        "<h2>Privacy spent</h2>",
        kv_table(s["privacy"]),
        "<h2>Model and data</h2>",
        kv_table(s["meta"]),
        "<h2>Notes</h2>",
        notes_list(s["notes"]),
    ]
    return page(f"fahr validation \u2014 {s['site']}", "\n".join(parts))


def site_summary(
    scores: PatientScores, context: SiteContext, saliency: CohortSaliency | None = None, n_boot: int = 200
) -> SiteSummary:
    """All statistics of one site's held-out patients with the site's description: the summary.

    Raises ValueError on malformed inputs (see ``evaluate``) and on FAD without age or an age model,
    TypeError on caller metadata holding arrays (which would be per-patient data).
    """
    p = scores  # short: read nine times below
    time, event, risk = as_arrays(p.time, p.event, p.risk)
    ev = evaluate(
        time,
        event,
        risk,
        n_boot=n_boot,
        age=p.age,
        male=p.male,
        surv_pred=p.surv_pred,
        horizon=context.horizon,
    )
    notes = list(ev.notes)
    fad = None
    if p.fad is not None:
        if p.age is None or context.age_model is None:
            raise ValueError("face-age deviations need the patients' age and a description of the age model")
        fad = replace(
            fad_statistics(time, event, risk, p.fad, p.age, p.male), age_model=plain(context.age_model)
        )
        notes += fad.notes
    return SiteSummary(
        site=str(context.site),
        evaluation=ev,
        fad=fad,
        saliency=None
        if saliency is None
        else SaliencySummary(
            method="gradient x input, per-face maps normalised to sum 1, mean over aligned faces",
            n_faces=saliency.n_faces,
            models=tuple(saliency.maps),
            similarity=saliency.similarity,
        ),
        alignment_qc=plain(context.qc),
        privacy=plain(context.privacy),
        meta=plain(context.meta),
        notes=tuple(notes),
    )


def write_site_report(
    out_dir: Path,
    scores: PatientScores,
    context: SiteContext,
    saliency: CohortSaliency | None = None,
    n_boot: int = 200,
) -> SiteSummary:
    """Evaluate one site's risk scores and write ``summary.json`` and ``report.html`` into ``out_dir``.

    Missing optional inputs (see :class:`PatientScores`, :class:`SiteContext`) make the report say "not
    available" or "not computed". ``saliency`` adds the models' mean saliency maps (drawn in the HTML
    only; the summary keeps their similarity). Returns the summary exactly as written; it holds
    aggregates only. summary.json is written last, so its presence means the report is complete.
    """
    summary = site_summary(scores, context, saliency, n_boot)
    ev = summary.evaluation
    km_png = None
    if quartile_skip_reason(ev.n, ev.events) is None:
        time, event, risk = as_arrays(scores.time, scores.event, scores.risk)
        km_png = figures.km_quartiles_png(km_by_quartile(time, event, risk_quartiles(risk)))
    cal_png = figures.calibration_png(ev.calibration.horizons) if ev.calibration else None
    out_dir = Path(out_dir)
    sal_png = None if saliency is None else figures.saliency_png(saliency.maps, saliency.mean_face)
    written = summary.to_json()
    atomic_write_text(out_dir / REPORT_PAGE, _render(written, km_png, cal_png, sal_png))
    atomic_write_json(out_dir / REPORT_SUMMARY, written)
    return summary
