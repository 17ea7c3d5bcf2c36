"""The cohort.csv contract: good sites load, every kind of bad row is reported with file and line."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fahr_core.cohort import (
    Cohort,
    CohortError,
    FaceLabelError,
    Patient,
    demo_faces_dir,
    load_cohort,
    load_labelled_faces,
    split_patients,
)

DEMO_IMAGES = sorted((demo_faces_dir() / "images").glob("*.jpg"))
SHARED_UTKFACE = Path(__file__).parents[2] / "shared" / "data" / "utkface"

HEADER = ["patient_id", "photo", "time", "event", "age", "sex", "bmi"]
# Data rows; row i sits on line i + 2 of cohort.csv (line 1 is the header).
GOOD_ROWS = [
    ["P0", "photos/p0.jpg", "2.5", "1", "71", "M", "27.1"],
    ["P1", "photos/p1.jpg", "10", "0", "45", "F", "22"],
    ["P1", "photos/p2.jpg", "10", "0", "45", "F", "22"],
    ["P2", "photos/p3.jpg", "0", "0", "30.5", "F", "30"],
    ["P3", "photos/p4.jpg", "4.25", "1", "66", "M", "25.0"],
    ["P4", "photos/p5.jpg", "7", "0", "52", "M", "24"],
]


def make_site(root: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    """A site folder with six real demo photos and a cohort.csv made of `rows`."""
    site = root / "site"
    (site / "photos").mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(DEMO_IMAGES[:6]):
        shutil.copyfile(src, site / "photos" / f"p{i}.jpg")
    with (site / "cohort.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return site


def problems_for(site: Path) -> list[str]:
    with pytest.raises(CohortError) as info:
        load_cohort(site)
    return info.value.problems


def test_good_site_loads(tmp_path: Path) -> None:
    cohort = load_cohort(make_site(tmp_path, GOOD_ROWS))
    assert len(cohort) == 5
    assert [p.patient_id for p in cohort.patients] == ["P0", "P1", "P2", "P3", "P4"]
    p1 = cohort.patients[1]
    assert [ph.name for ph in p1.photos] == ["p1.jpg", "p2.jpg"]
    assert all(ph.is_absolute() and ph.is_file() for ph in p1.photos)
    np.testing.assert_array_equal(cohort.time, [2.5, 10.0, 0.0, 4.25, 7.0])
    np.testing.assert_array_equal(cohort.event, [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(cohort.age, [71.0, 45.0, 30.5, 66.0, 52.0])
    np.testing.assert_array_equal(cohort.is_male, [True, False, False, True, True])
    assert cohort.patients[0].covariates == {"bmi": 27.1}


def test_bom_spaces_blank_lines_and_backslashes_are_tolerated(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_ROWS)
    text = "\ufeffpatient_id, photo ,time,event,age,sex\n P0 ,photos\\p0.jpg, 1.5 ,1, 60 , F \n\n"
    (site / "cohort.csv").write_text(text, encoding="utf-8")
    cohort = load_cohort(site)
    assert cohort.patients == (Patient("P0", (site.resolve() / "photos/p0.jpg",), 1.5, 1, 60.0, "F", {}),)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("time", "-2", "time '-2' is negative"),
        ("time", "abc", "time 'abc' is not a number"),
        ("time", "inf", "time 'inf' is not a finite number"),
        ("event", "2", "event '2' must be 0 (censored) or 1 (death)"),
        ("event", "yes", "event 'yes' must be 0 (censored) or 1 (death)"),
        ("age", "old", "age 'old' is not a number"),
        ("age", "1950", "age '1950' is outside 0..130 years"),
        ("sex", "male", "sex 'male' must be M or F"),
        ("patient_id", "", "patient_id is empty"),
        ("photo", "photos/missing.jpg", "photo file 'photos/missing.jpg' not found"),
        ("photo", "../other/p0.jpg", "photo '../other/p0.jpg' contains '..'"),
        ("photo", "/etc/passwd", "photo '/etc/passwd' is an absolute path"),
        ("photo", "C:\\faces\\p0.jpg", "photo 'C:\\faces\\p0.jpg' is an absolute path"),
        ("bmi", "NA", "covariate 'bmi' value 'NA' is not a finite number"),
    ],
)
def test_each_bad_cell_is_named_with_file_and_line(
    tmp_path: Path, column: str, value: str, message: str
) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    rows[3][HEADER.index(column)] = value  # the P2 row, line 5
    problems = problems_for(make_site(tmp_path, rows))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"cohort.csv line 5: {message}")


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    drop = HEADER.index("event")
    rows = [r[:drop] + r[drop + 1 :] for r in GOOD_ROWS]
    header = HEADER[:drop] + HEADER[drop + 1 :]
    assert problems_for(make_site(tmp_path, rows, header)) == [
        "cohort.csv line 1: missing required column(s) 'event'"
    ]


def test_empty_file_header_only_and_missing_file(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_ROWS)
    (site / "cohort.csv").write_text("", encoding="utf-8")
    assert problems_for(site) == ["cohort.csv line 1: file is empty (expected a header row)"]
    (site / "cohort.csv").write_text(",".join(HEADER) + "\n", encoding="utf-8")
    assert problems_for(site) == ["cohort.csv: no data rows after the header"]
    (site / "cohort.csv").unlink()
    with pytest.raises(CohortError, match="cohort.csv not found") as info:
        load_cohort(site)
    assert str(site.resolve() / "cohort.csv") in str(info.value)


def test_conflicting_duplicate_patient_names_both_lines(tmp_path: Path) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    rows[5] = ["P0", "photos/p5.jpg", "3.0", "1", "71", "M", "27.1"]  # P0 again with another time
    assert problems_for(make_site(tmp_path, rows)) == [
        "cohort.csv line 7: patient 'P0' has time/event/age/sex/covariates that conflict with line 2"
    ]


def test_photo_listed_twice_and_ragged_row(tmp_path: Path) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    rows[5] = ["P4", "photos/p0.jpg", "7", "0", "52", "M", "24"]
    rows.append(["P9", "photos/p5.jpg", "1"])
    assert problems_for(make_site(tmp_path, rows)) == [
        "cohort.csv line 8: has 3 fields, the header has 7",
        "cohort.csv line 7: photo 'photos/p0.jpg' is already listed on line 2; each photo may be listed once",
    ]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    rows[0][HEADER.index("sex")] = "x"
    rows[2][HEADER.index("time")] = "-1"
    rows[4][HEADER.index("age")] = ""
    rows[4][HEADER.index("event")] = "3"
    site = make_site(tmp_path, rows)
    with pytest.raises(CohortError) as info:
        load_cohort(site)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{site.resolve() / 'cohort.csv'}: 4 problem(s) found"
    assert lines[1:] == info.value.problems
    assert [p.split(":")[0] for p in info.value.problems] == [
        "cohort.csv line 2",
        "cohort.csv line 4",
        "cohort.csv line 6",
        "cohort.csv line 6",
    ]


def synthetic_cohort(n: int, n_events: int) -> Cohort:
    patients = tuple(
        Patient(f"id{i:05d}", (Path(f"/x/{i}.jpg"),), float(i), int(i < n_events), 50.0, "F", {})
        for i in range(n)
    )
    return Cohort(Path("/x"), patients)


def test_split_is_reproducible_disjoint_and_order_independent() -> None:
    cohort = synthetic_cohort(40, 12)
    train, test = split_patients(cohort, 0.25, seed=3)
    again_train, again_test = split_patients(cohort, 0.25, seed=3)
    assert train.patient_ids == again_train.patient_ids and test.patient_ids == again_test.patient_ids
    assert not set(train.patient_ids) & set(test.patient_ids)
    assert sorted(train.patient_ids + test.patient_ids) == sorted(cohort.patient_ids)
    assert 0 < len(test) < len(cohort)
    reordered = Cohort(cohort.site_dir, cohort.patients[::-1])
    assert set(split_patients(reordered, 0.25, seed=3)[1].patient_ids) == set(test.patient_ids)
    other_seeds = {tuple(split_patients(cohort, 0.25, seed=s)[1].patient_ids) for s in range(4, 9)}
    assert len(other_seeds - {tuple(test.patient_ids)}) >= 4
    with pytest.raises(ValueError, match="test_fraction"):
        split_patients(cohort, 1.0, seed=0)


def test_enrolment_and_withdrawal_never_move_an_existing_patient() -> None:
    """Item 9: a permutation over sorted ids moved about a third of the test set when one patient joined."""
    cohort = synthetic_cohort(300, 90)
    train, test = split_patients(cohort, 0.3, seed=7)
    side = {**dict.fromkeys(train.patient_ids, "train"), **dict.fromkeys(test.patient_ids, "test")}
    enrolled = tuple(
        Patient(f"new{i:03d}", (Path(f"/x/new{i}.jpg"),), 1.0, i % 2, 60.0, "M", {}) for i in range(50)
    )
    for grown in (
        Cohort(cohort.site_dir, (*cohort.patients, enrolled[0])),  # one new patient
        Cohort(cohort.site_dir, (*enrolled, *cohort.patients)),  # fifty, listed first
        Cohort(cohort.site_dir, cohort.patients[::3]),  # two thirds withdrawn
    ):
        new_train, new_test = split_patients(grown, 0.3, seed=7)
        for pid in new_train.patient_ids:
            assert side.get(pid, "train") == "train", pid
        for pid in new_test.patient_ids:
            assert side.get(pid, "test") == "test", pid
    # an outcome update (censored -> died) does not move the patient either
    updated = Cohort(cohort.site_dir, tuple(replace(p, event=1) for p in cohort.patients))
    assert split_patients(updated, 0.3, seed=7)[1].patient_ids == test.patient_ids


def test_test_share_is_binomial_around_the_target() -> None:
    """On a large cohort the test share (overall and among deaths) is within 4 binomial SDs of the target."""
    n, fraction = 20_000, 0.3
    cohort = synthetic_cohort(n, n // 4)
    _, test = split_patients(cohort, fraction, seed=0)
    assert abs(len(test) / n - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n)
    deaths = n // 4
    assert abs(test.event.sum() / deaths - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / deaths)
    # raising the fraction only adds patients to test
    assert set(test.patient_ids) <= set(split_patients(cohort, 0.4, seed=0)[1].patient_ids)


def test_bundled_demo_faces() -> None:
    faces = load_labelled_faces(demo_faces_dir())
    assert len(faces) == 360 and len(DEMO_IMAGES) == 360
    ages = np.array([f.age for f in faces])
    assert ages.min() >= 18 and ages.max() <= 90
    assert np.sum(ages >= 70) == 60
    assert sum(f.sex == "M" for f in faces) == 180
    assert all(f.path.is_file() for f in faces)


def test_labelled_faces_skip_empty_sex_and_name_bad_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "images").mkdir()
    shutil.copyfile(DEMO_IMAGES[0], tmp_path / "images" / "a.jpg")
    lines = ["file,age,sex,race", "images/a.jpg,40,F,white", "images/a.jpg,41,,white"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="fahr_core.cohort.faces"):
        faces = load_labelled_faces(tmp_path)
    assert [(f.age, f.sex) for f in faces] == [(40.0, "F")]
    assert "skipped 1 row(s) with an empty sex label" in caplog.text

    lines += ["images/a.jpg,forty,F,white", "images/b.jpg,30,M,asian", "images/a.jpg,30,X,asian"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(FaceLabelError) as info:
        load_labelled_faces(tmp_path)
    where = f"{tmp_path / 'labels.csv'} line"
    assert info.value.problems == [
        f"{where} 4: age 'forty' is not an age in years",
        f"{where} 5: image 'images/b.jpg' not found in {tmp_path}",
        f"{where} 6: sex 'X' must be M, F or empty",
    ]


@pytest.mark.skipif(not SHARED_UTKFACE.is_dir(), reason="shared UTKFace copy not present")
def test_full_utkface_labels_load() -> None:
    faces = load_labelled_faces(SHARED_UTKFACE)
    assert len(faces) > 18000
    assert {f.sex for f in faces} == {"M", "F"}
