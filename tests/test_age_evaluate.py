"""Age evaluation numbers, checked against values worked out by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fahr_core.age.evaluate import age_metrics, write_evaluation
from fahr_core.cohort import FaceRecord

AGES = [5.0, 15.0, 15.0, 95.0, 100.0]
PREDICTED = [7.0, 10.0, 20.0, 80.0, 100.0]  # errors 2, 5, 5, 15, 0
SEX = ["M", "F", "", "F", "F"]
RACE = ["asian", "white", "white", "", "white"]


def test_metrics_by_hand() -> None:
    m = age_metrics(AGES, PREDICTED, SEX, RACE)
    assert m["n"] == 5 and m["mae"] == pytest.approx(27 / 5) and m["bias"] == pytest.approx(-13 / 5)
    assert list(m["by_decade"]) == ["0-9", "10-19", "90+"]  # 95 and 100 share the top bin
    assert [v["mae"] for v in m["by_decade"].values()] == pytest.approx([2.0, 5.0, 7.5])
    assert m["mean_decade_mae"] == pytest.approx((2 + 5 + 7.5) / 3)
    assert m["by_sex"] == {"F": {"n": 3, "mae": pytest.approx(20 / 3)}, "M": {"n": 1, "mae": 2.0}}
    assert m["by_race"]["white"] == {"n": 3, "mae": pytest.approx(10 / 3)} and "" not in m["by_race"]
    with pytest.raises(ValueError, match="as many predictions"):
        age_metrics(AGES, PREDICTED[:3])


def test_written_files_agree(tmp_path: Path) -> None:
    labels = zip(AGES, SEX, RACE, strict=True)
    faces = [FaceRecord(Path(f"f{i}.jpg"), a, s, r) for i, (a, s, r) in enumerate(labels)]
    m = write_evaluation(tmp_path, faces, PREDICTED, {"model": "m.safetensors"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"] == "m.safetensors" and saved["mae"] == pytest.approx(m["mae"])
    with (tmp_path / "groups.csv").open() as f:
        groups = {(r["group"], r["value"]): (int(r["n"]), float(r["mae"])) for r in csv.DictReader(f)}
    assert groups[("all", "")] == (5, 5.4) and groups[("decade", "90+")] == (2, 7.5)
    assert groups[("race", "asian")] == (1, 2.0)
    with (tmp_path / "predictions.csv").open() as f:
        assert [float(r["error"]) for r in csv.DictReader(f)] == [2.0, -5.0, 5.0, -15.0, 0.0]
    assert (tmp_path / "error_vs_age.png").stat().st_size > 1000
