"""Site and federation reports: files written, self-contained HTML, aggregate-only JSON."""

from __future__ import annotations

import html as html_lib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fahr_core.protocol.wire import metrics_to_summary
from fahr_core.report.federation import write_federation_report
from fahr_core.report.site import write_site_report
from fahr_core.report.summary import PatientScores, SiteContext
from tests.support import DEGENERATE, META, PRIVACY, QC, cohort, full_site_report, images

KM_ALT = "Kaplan-Meier survival curves by risk quartile"
# The longest list a summary may hold: calibration bins (<= 5) and td-AUC horizons (3). Anything longer
# would be per-patient data.
MAX_AGGREGATE_LIST = 5


def longest_list(obj: object) -> int:
    if isinstance(obj, dict):
        return max((longest_list(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return max([len(obj), *(longest_list(v) for v in obj)])
    return 0


def assert_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    for external in ("<script", "<link", 'src="http', "url(http"):
        assert external not in html


def site_report(
    out: Path, site: str, t, e, r, n_boot: int, meta: dict = META, qc=None, horizon=None, **more
) -> dict:
    """The report of `site` written into `out`; `more` are the optional PatientScores; its summary's JSON."""
    context = SiteContext(site, PRIVACY, meta, horizon=horizon, qc=qc)
    return write_site_report(out, PatientScores(t, e, r, **more), context, n_boot=n_boot).to_json()


def test_site_report_writes_readable_page_and_aggregate_summary(tmp_path: Path) -> None:
    t, e, r = cohort(200, seed=11)
    summary = site_report(tmp_path, "hospital-a", t, e, r, n_boot=50)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["privacy"]["epsilon"] == 2.5 and summary["meta"]["rounds"] == 5
    assert summary["c_index"] > 0.6 and len(summary["c_index_ci"]) == 2
    assert summary["hr_top_vs_bottom"]["hr"] > 1 and summary["logrank_p"] < 0.05
    assert longest_list(on_disk) <= MAX_AGGREGATE_LIST, "summary.json must hold aggregates only"

    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    assert list(images(html)) == [KM_ALT]
    assert f"C-index (Harrell) {summary['c_index']:.2f}" in html and "95% CI" in html
    assert "hospital-a" in html and "noise_multiplier" in html
    # optional inputs absent: said so, not silently dropped
    assert summary["age"] is None and summary["calibration"] is None and summary["alignment_qc"] is None
    assert "Alignment quality control: not available" in html and "age and sex not supplied" in html
    assert "Calibration is not assessed" in html


def test_site_report_names_uno_tau_and_says_when_it_is_capped(tmp_path: Path) -> None:
    """Item 8: Uno's C at the model horizon, the same at every site; a capped tau is named, never hidden."""
    rng = np.random.default_rng(12)
    n = 300
    risk = rng.normal(size=n)
    t_death = rng.exponential(8.0 * np.exp(-risk))
    for name, follow_up, capped in (("long", 40.0, False), ("short", 6.0, True)):
        t_censor = np.minimum(rng.uniform(0.0, follow_up, n), 10.0)
        t, e = np.minimum(t_death, t_censor), (t_death <= t_censor).astype(int)
        summary = site_report(tmp_path / name, name, t, e, risk, 20, horizon=10.0)
        html = (tmp_path / name / "report.html").read_text()
        assert summary["uno_c"] is not None and summary["uno_c_horizon"] == 10.0
        assert "does not depend on how long this site followed" not in html
        if capped:
            tau = summary["uno_c_tau"]
            assert tau < 6 and tau == int(tau)
            assert f"(tau = {tau:g}), not the model&#x27;s horizon of 10 years" in html
            assert f"Compare it only with sites whose tau is also {tau:g} years" in html
        else:
            assert summary["uno_c_tau"] == 10.0
            assert "(tau = 10, the model&#x27;s horizon, the same at every site)" in html


def test_full_site_report_has_every_section_and_aggregate_summary(tmp_path: Path) -> None:
    summary = full_site_report(tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert longest_list(on_disk) <= MAX_AGGREGATE_LIST
    for key in ("uno_c", "uno_c_ci", "hr_per_sd", "hr_per_sd_adjusted", "hr_top_vs_bottom_adjusted"):
        assert summary[key] is not None, key
    assert [row["years"] for row in summary["td_auc"]] == [1.0, 2.0, 5.0]
    assert all(row["auc"] is not None for row in summary["td_auc"])
    assert summary["ph_test"]["p"].keys() == {"risk_per_sd", "age", "male"}
    assert summary["calibration"]["mean_abs_diff"] < 0.06 and summary["alignment_qc"] == QC
    assert 0 < summary["male_percent"] < 100 and summary["age"]["sd"] > 0

    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    alts = list(images(html))
    assert alts[0] == KM_ALT and alts[1].startswith("Calibration plot") and len(alts) == 2
    for text in (
        "Uno's C-index:",
        "Time-dependent AUC",
        "Adjusted for age and sex HR",
        "Proportional-hazards check",
        "After accounting for age and sex",
        "Mean |predicted",
        "rejected: no face",
        "296",
        "vit-s16@abc123",
        "Age, mean (SD)",
    ):
        assert text in html, text
    assert "not available" not in html


@pytest.mark.parametrize("name", ["no_events", "one_event", "n5", "all_tied_times", "time_zero", "empty"])
def test_degenerate_full_site_report_still_written_with_notes(tmp_path: Path, name: str) -> None:
    t, e, r = DEGENERATE[name]
    n = len(t)
    summary = site_report(
        tmp_path,
        name,
        t,
        e,
        r,
        20,
        qc=QC,
        age=np.linspace(40, 80, n),
        male=np.arange(n) % 2,
        surv_pred={1.0: np.full(n, 0.8), 2.0: np.full(n, 0.6)},
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary and summary["notes"]
    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    found = images(html)
    assert all(html_lib.escape(note) in html for note in summary["notes"])
    if KM_ALT not in found:
        assert "Kaplan-Meier curves by risk quartile are not shown" in html
    if not any(alt.startswith("Calibration plot") for alt in found):
        assert "calibration figure is not shown" in html


@pytest.mark.parametrize("name", ["no_events", "one_event", "n5", "all_tied_times", "empty"])
def test_site_report_on_degenerate_cohort_explains_missing_figures(tmp_path: Path, name: str) -> None:
    summary = site_report(tmp_path, name, *DEGENERATE[name], n_boot=50)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    assert summary["notes"] and all(html_lib.escape(n) in html for n in summary["notes"])
    if summary["hr_top_vs_bottom"] is None:
        assert "not computed; see the notes" in html


def test_site_report_escapes_html_and_refuses_arrays(tmp_path: Path) -> None:
    t, e, r = cohort(30, seed=12)
    site_report(tmp_path, "<script>x</script>", t, e, r, n_boot=20)
    assert "<script>x" not in (tmp_path / "report.html").read_text()
    with pytest.raises(TypeError):
        site_report(tmp_path / "bad", "b", t, e, r, n_boot=20, meta={"risk": r})
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_federation_report_weights_sites_and_skips_missing_c_index(tmp_path: Path) -> None:
    summaries = []
    for i, (n, seed) in enumerate([(120, 21), (300, 22)]):
        summaries.append(site_report(tmp_path / f"s{i}", f"site-{i}", *cohort(n, seed=seed), 50))
    summaries.append(site_report(tmp_path / "s2", "site-empty", *DEGENERATE["no_events"], 50))
    assert summaries[2]["c_index"] is None

    g = write_federation_report(tmp_path / "global", summaries, {"rounds": 5})
    assert json.loads((tmp_path / "global" / "summary.json").read_text()) == g
    expected = (120 * summaries[0]["c_index"] + 300 * summaries[1]["c_index"]) / 420
    assert g["c_index_weighted_mean"] == pytest.approx(expected)
    assert g["c_index_weighted_n"] == 420 and g["n_total"] == 450 and g["n_sites"] == 3
    assert any("site-empty" in n for n in g["notes"])

    html = (tmp_path / "global" / "report.html").read_text()
    assert_self_contained(html)
    alts = list(images(html))
    assert alts[0] == "Forest plot of the C-index by site" and alts[1].startswith("Forest plot of the age-")
    assert all(s in html for s in ("site-0", "site-1", "site-empty", "2.50"))
    assert "tau: the model's horizon at every site" in html and "names its tau" in html


def test_federation_report_forest_plots_of_adjusted_hr_and_legacy_sites(tmp_path: Path) -> None:
    summaries = [full_site_report(tmp_path / f"s{i}", n=200 + 100 * i, n_boot=10) for i in range(2)]
    for i, s in enumerate(summaries):
        s["site"] = f"site-{i}"
    # an older site summary, as rebuilt by the server from scalar metrics: none of the new fields
    legacy = {"site": "legacy", "n": 80, "events": 20, "c_index": 0.66, "c_index_ci": [0.58, 0.74]}
    g = write_federation_report(tmp_path / "global", [*summaries, legacy], {"rounds": 5})
    assert json.loads((tmp_path / "global" / "summary.json").read_text()) == g
    pooled = g["hr_per_sd_adjusted_pooled"]
    assert pooled["n_sites"] == 2 and 0 <= pooled["i2"] <= 1
    his = [s["hr_per_sd_adjusted"]["hr"] for s in summaries]
    assert min(his) <= pooled["hr"] <= max(his) and pooled["ci_low"] < pooled["hr"] < pooled["ci_high"]
    assert any("legacy" in n and "pooled hazard ratio" in n for n in g["notes"])
    html = (tmp_path / "global" / "report.html").read_text()
    assert_self_contained(html)
    assert len(images(html)) == 2 and "legacy" in html and "I\u00b2 = " in html


def test_federation_report_with_no_sites(tmp_path: Path) -> None:
    g = write_federation_report(tmp_path, [], {})
    assert g["c_index_weighted_mean"] is None and g["notes"]
    assert "base64" not in (tmp_path / "report.html").read_text()


def test_federation_report_pools_the_sites_fad_hazard_ratios_from_their_metrics(tmp_path: Path) -> None:
    """The FAD aggregates arrive as wire metrics; the global report tables and pools them."""
    z = 1.959963984540054
    sent = {
        "a": {"hr": 1.5, "low": 1.1, "high": 2.0, "r": 0.3, "p": 0.01},
        "b": {"hr": 1.2, "low": 0.8, "high": 1.8, "r": -0.1, "p": 0.4},
    }
    summaries = [
        metrics_to_summary(
            site,
            {
                "num-examples": 60,
                "fad-hr-decade": v["hr"],
                "fad-hr-decade-low": v["low"],
                "fad-hr-decade-high": v["high"],
                "fad-risk-r": v["r"],
                "fad-risk-r-low": v["r"] - 0.2,
                "fad-risk-r-high": v["r"] + 0.2,
                "fad-lr-p": v["p"],
                "saliency-similarity": 0.8,
            },
        )
        for site, v in sent.items()
    ]
    g = write_federation_report(tmp_path / "global", summaries, {"rounds": 1})
    se = [(math.log(v["high"]) - math.log(v["low"])) / (2 * z) for v in sent.values()]
    w = [1 / e**2 for e in se]
    log_hr = sum(wi * math.log(v["hr"]) for wi, v in zip(w, sent.values(), strict=True)) / sum(w)
    pooled = g["fad_hr_per_decade_pooled"]
    assert pooled["hr"] == pytest.approx(math.exp(log_hr)) and pooled["n_sites"] == 2
    html = (tmp_path / "global" / "report.html").read_text()
    assert "Face-age deviation by site" in html and "1.50 (1.10\u20132.00)" in html
    assert any(
        alt.startswith("Forest plot of the age- and sex-adjusted hazard ratio per decade")
        for alt in images(html)
    )
    legacy = write_federation_report(tmp_path / "legacy", [{"site": "x", "n": 5}], {})
    assert legacy["fad_hr_per_decade_pooled"] is None
    assert "Face-age deviation" not in (tmp_path / "legacy" / "report.html").read_text()
