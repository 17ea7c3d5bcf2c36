"""Site and federation reports: files written, self-contained HTML, aggregate-only JSON."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fahr_core.report.federation import write_federation_report
from fahr_core.report.site import write_site_report


def cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential event times with hazard exp(risk), independent exponential censoring."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-risk))
    t_censor = rng.exponential(2.0, size=n)
    return np.minimum(t_event, t_censor), (t_event <= t_censor).astype(int), risk


DEGENERATE = {
    "no_events": (np.linspace(0.1, 3, 30), np.zeros(30, int), np.linspace(-1, 1, 30)),
    "one_event": (np.linspace(0.1, 3, 30), np.r_[1, np.zeros(29, int)], np.linspace(-1, 1, 30)),
    "n5": (np.array([0.5, 1.0, 1.5, 2.0, 2.5]), np.array([1, 0, 1, 0, 1]), np.arange(5.0)),
    "all_tied_times": (np.ones(20), np.ones(20, int), np.linspace(-1, 1, 20)),
    "empty": (np.array([]), np.array([], int), np.array([])),
}
PRIVACY = {"epsilon": np.float64(2.5), "delta": 1e-5, "budget": 8.0, "noise_multiplier": 1.1}
META = {"model_version": "vit-s16@abc123", "data_version": "2024-06", "rounds": 5}
KM_IMG = re.compile(
    r'<img alt="Kaplan-Meier by risk quartile" src="data:image/png;base64,([A-Za-z0-9+/=]+)">'
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def test_site_report_writes_readable_page_and_aggregate_summary(tmp_path: Path) -> None:
    t, e, r = cohort(200, seed=11)
    summary = write_site_report(tmp_path, "hospital-a", t, e, r, PRIVACY, META, n_boot=50)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["privacy"]["epsilon"] == 2.5 and summary["meta"]["rounds"] == 5
    assert summary["c_index"] > 0.6 and len(summary["c_index_ci"]) == 2
    assert summary["hr_top_vs_bottom"]["hr"] > 1 and summary["logrank_p"] < 0.05
    assert longest_list(on_disk) <= 2, "summary.json must hold aggregates, not per-patient arrays"

    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    png = base64.b64decode(KM_IMG.search(html).group(1))
    assert png.startswith(PNG_MAGIC)
    assert f"C-index {summary['c_index']:.2f}" in html and "95% CI" in html
    assert "hospital-a" in html and "noise_multiplier" in html


@pytest.mark.parametrize("name", ["no_events", "one_event", "n5", "all_tied_times", "empty"])
def test_site_report_on_degenerate_cohort_explains_missing_figures(tmp_path: Path, name: str) -> None:
    summary = write_site_report(tmp_path, name, *DEGENERATE[name], PRIVACY, META, n_boot=50)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    assert summary["notes"] and all(n.split(":")[0] in html for n in summary["notes"])
    if summary["hr_top_vs_bottom"] is None:
        assert "not computed; see the notes" in html


def test_site_report_escapes_html_and_refuses_arrays(tmp_path: Path) -> None:
    t, e, r = cohort(30, seed=12)
    write_site_report(tmp_path, "<script>x</script>", t, e, r, PRIVACY, META, n_boot=20)
    assert "<script>x" not in (tmp_path / "report.html").read_text()
    with pytest.raises(TypeError):
        write_site_report(tmp_path / "bad", "b", t, e, r, PRIVACY, {"risk": r}, n_boot=20)
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_federation_report_weights_sites_and_skips_missing_c_index(tmp_path: Path) -> None:
    summaries = []
    for i, (n, seed) in enumerate([(120, 21), (300, 22)]):
        summaries.append(
            write_site_report(tmp_path / f"s{i}", f"site-{i}", *cohort(n, seed=seed), PRIVACY, META, 50)
        )
    summaries.append(
        write_site_report(tmp_path / "s2", "site-empty", *DEGENERATE["no_events"], PRIVACY, META, 50)
    )
    assert summaries[2]["c_index"] is None

    g = write_federation_report(tmp_path / "global", summaries, {"rounds": 5})
    assert json.loads((tmp_path / "global" / "summary.json").read_text()) == g
    expected = (120 * summaries[0]["c_index"] + 300 * summaries[1]["c_index"]) / 420
    assert g["c_index_weighted_mean"] == pytest.approx(expected)
    assert g["c_index_weighted_n"] == 420 and g["n_total"] == 450 and g["n_sites"] == 3
    assert any("site-empty" in n for n in g["notes"])

    html = (tmp_path / "global" / "report.html").read_text()
    assert_self_contained(html)
    m = re.search(
        r'alt="C-index by site \(forest plot\)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html
    )
    assert base64.b64decode(m.group(1)).startswith(PNG_MAGIC)
    assert all(s in html for s in ("site-0", "site-1", "site-empty", "2.50"))


def test_federation_report_with_no_sites(tmp_path: Path) -> None:
    g = write_federation_report(tmp_path, [], {})
    assert g["c_index_weighted_mean"] is None and g["notes"]
    assert "base64" not in (tmp_path / "report.html").read_text()
