"""Age data-set loaders: each public layout built in tmp from the bundled faces, bad rows named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fahr_core.age.datasets import (
    detect_layout,
    load_age_faces,
    load_agedb,
    load_appa_real,
    load_utkface,
)
from fahr_core.cohort import FaceLabelError, demo_faces_dir, load_labelled_faces


@pytest.fixture(scope="module")
def demo() -> list:
    return load_labelled_faces(demo_faces_dir())[:12]


def test_labels_layout_keeps_race(demo) -> None:
    faces = load_age_faces(demo_faces_dir())
    assert detect_layout(demo_faces_dir()) == "labels"
    assert len(faces) == 360 and {f.race for f in faces} <= {"white", "black", "asian", "indian", "other", ""}
    assert faces[0].race == "white" and faces[1].race == "black"  # the first rows of labels.csv


def test_utkface_file_names(tmp_path, demo) -> None:
    for i, f in enumerate(demo):  # some in a sub-folder: UTKFace ships in parts
        dest = tmp_path / ("part2" if i % 2 else "") / f.path.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(f.path, dest)
    assert detect_layout(tmp_path) == "utkface"
    got = {f.path.name: f for f in load_utkface(tmp_path)}
    assert len(got) == len(demo)
    for f in demo:
        assert (got[f.path.name].age, got[f.path.name].sex, got[f.path.name].race) == (f.age, f.sex, f.race)
    shutil.copy(demo[0].path, tmp_path / "39_1_20170116174525125.jpg.chip.jpg")  # race missing
    shutil.copy(demo[0].path, tmp_path / "200x_0_0_20170116174525125.jpg")
    with pytest.raises(FaceLabelError) as e:
        load_utkface(tmp_path)
    assert len(e.value.problems) == 2
    assert "39_1_20170116174525125.jpg.chip.jpg: file name does not follow UTKFace" in str(e.value)


def test_agedb_file_names(tmp_path, demo) -> None:
    for i, f in enumerate(demo):
        shutil.copy(f.path, tmp_path / f"{i}_Mary_Jane_Doe{i}_{f.age:g}_{f.sex.lower()}.jpg")
    assert detect_layout(tmp_path) == "agedb"
    faces = sorted(load_agedb(tmp_path), key=lambda f: int(f.path.name.split("_")[0]))
    assert [(f.age, f.sex) for f in faces] == [(f.age, f.sex) for f in demo]
    shutil.copy(demo[0].path, tmp_path / "99_NoAge_m.jpg")
    with pytest.raises(FaceLabelError, match=r"99_NoAge_m\.jpg: file name does not follow AgeDB"):
        load_age_faces(tmp_path, "agedb")


def _appa(root: Path, demo: list, categories: bool = True) -> None:
    (root / "valid").mkdir(parents=True)
    gt = ["file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age"]
    cats = ["file,gender,race,makeup,time,happiness"]
    for i, f in enumerate(demo):
        name = f"{5613 + i:06d}.jpg"
        shutil.copy(f.path, root / "valid" / name)
        gt.append(f"{name},38,{f.age + 3:.3f},4.1,{f.age:g}")
        cats.append(f"{name},{'male' if f.sex == 'M' else 'female'},caucasian,nomakeup,modern,slightlyhappy")
    (root / "gt_avg_valid.csv").write_text("\n".join(gt) + "\n")
    if categories:
        (root / "allcategories_valid.csv").write_text("\n".join(cats) + "\n")


def test_appa_real_csv(tmp_path, demo) -> None:
    _appa(tmp_path, demo)
    assert detect_layout(tmp_path) == "appa"
    faces = load_appa_real(tmp_path, "valid")
    assert [(f.age, f.sex) for f in faces] == [(f.age, f.sex) for f in demo]  # real age, not apparent
    assert {f.race for f in faces} == {"caucasian"}
    (tmp_path / "allcategories_valid.csv").unlink()
    assert {f.sex for f in load_age_faces(tmp_path)} == {""}  # without the categories file: unknown


def test_appa_real_names_every_bad_line(tmp_path, demo) -> None:
    _appa(tmp_path, demo[:4], categories=False)
    gt = tmp_path / "gt_avg_valid.csv"
    lines = gt.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",unknown"
    lines[4] = "missing.jpg" + lines[4][len("005616.jpg") :]
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(FaceLabelError) as e:
        load_appa_real(tmp_path)
    assert len(e.value.problems) == 2
    assert f"{gt} line 3: real_age 'unknown'" in e.value.problems[0]
    assert f"{gt} line 5: image 'missing.jpg' not found" in e.value.problems[1]
    gt.write_text("file,age\n")
    with pytest.raises(FaceLabelError, match="line 1: missing column"):
        load_appa_real(tmp_path)


def test_unknown_layout_is_refused(tmp_path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(b"")
    with pytest.raises(FaceLabelError, match="unknown layout"):
        load_age_faces(tmp_path)
    with pytest.raises(ValueError, match="unknown layout 'imdb'"):
        load_age_faces(demo_faces_dir(), "imdb")
