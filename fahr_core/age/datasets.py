"""Labelled public age data sets in their own layouts, read into one list of `FaceRecord`s.

FAHR-FaceAge is trained and tested on several public sets, each with its own way of storing the
labels. Every loader returns `FaceRecord(path, age, sex, race)` with sex "M"/"F" or "" and race as
the set spells it (or ""), and raises `FaceLabelError` naming every bad file or CSV line at once,
so a damaged copy is fixed in one go rather than one error per run.

Layouts (checked against the releases' documentation; assumptions noted where it is silent):

- `labels`: fahr's own `labels.csv` (`file,age,sex,race`), read by `fahr_core.cohort.faces`.
- `utkface`: the UTKFace release's file names `{age}_{gender}_{race}_{date}.jpg[.chip.jpg]`, gender
  0 = male, 1 = female, race 0-4 = white, black, asian, indian, other. A few files of the original
  release lack a field; they are reported, not guessed.
- `agedb`: AgeDB's file names `{id}_{Name}_{age}_{gender}.jpg`, gender `m`/`f`. Names are taken
  from the right (`age` and `gender` are the last two fields) so a name with an underscore still
  parses.
- `appa`: APPA-REAL's `gt_avg_{part}.csv` (`file_name,num_ratings,apparent_age_avg,
  apparent_age_std,real_age`, images in `{part}/`), with `allcategories_{part}.csv`
  (`file,gender,race,...`, gender male/female) when present. The real age is the label; the
  apparent age is ignored.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from pathlib import Path

from fahr_core.cohort.faces import LABELS_FILE, FaceLabelError, FaceRecord, load_labelled_faces
from fahr_core.train.pretrain import list_images

LAYOUTS = ("labels", "utkface", "agedb", "appa")
UTKFACE_RACES = ("white", "black", "asian", "indian", "other")
MAX_AGE = 130.0

_UTKFACE_NAME = re.compile(r"^(\d+)_([01])_([0-4])_\d+\.jpg(\.chip\.jpg)?$", re.IGNORECASE)
_AGEDB_NAME = re.compile(r"^\d+_(.+)_(\d+)_([mf])\.(jpg|jpeg|png)$", re.IGNORECASE)
_APPA_SEX = {"male": "M", "female": "F"}


def _parse_age(text: str) -> float | None:
    try:
        age = float(text)
    except ValueError:
        return None
    return age if math.isfinite(age) and 0.0 <= age <= MAX_AGE else None


def _from_names(
    folder: Path, parse: Callable[[str], tuple[float, str, str] | None], expected: str
) -> list[FaceRecord]:
    """Records from image file names under `folder`; `parse` returns (age, sex, race) or None."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceLabelError([f"{folder}: not a folder"])
    faces: list[FaceRecord] = []
    problems: list[str] = []
    for rel in list_images(folder):
        parsed = parse(Path(rel).name)
        if parsed is None:
            problems.append(f"{folder / rel}: file name does not follow {expected}")
        else:
            faces.append(FaceRecord(folder / rel, *parsed))
    if problems:
        raise FaceLabelError(problems)
    if not faces:
        raise FaceLabelError([f"{folder}: no images found"])
    return faces


def _utkface(name: str) -> tuple[float, str, str] | None:
    m = _UTKFACE_NAME.match(name)
    if m is None or (age := _parse_age(m[1])) is None:
        return None
    return age, "MF"[int(m[2])], UTKFACE_RACES[int(m[3])]


def _agedb(name: str) -> tuple[float, str, str] | None:
    m = _AGEDB_NAME.match(name)
    if m is None or (age := _parse_age(m[2])) is None:
        return None
    return age, m[3].upper(), ""


def load_utkface(folder: Path) -> list[FaceRecord]:
    """UTKFace images (any depth under `folder`) labelled by their file names."""
    return _from_names(folder, _utkface, "UTKFace's age_gender(0/1)_race(0-4)_date.jpg")


def load_agedb(folder: Path) -> list[FaceRecord]:
    """AgeDB images (any depth under `folder`) labelled by their file names."""
    return _from_names(folder, _agedb, "AgeDB's id_Name_age_gender(m/f).jpg")


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV as (where, row), checking the header has `columns`."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise FaceLabelError([f"{path} line 1: missing column(s) {', '.join(map(repr, missing))}"])
        return [(f"{path} line {reader.line_num}", row) for row in reader]


def load_appa_real(root: Path, part: str = "") -> list[FaceRecord]:
    """APPA-REAL's `gt_avg_{part}.csv` (+ `allcategories_{part}.csv`); all parts found if `part` is ""."""
    root = Path(root)
    parts = [part] if part else sorted(p.name[len("gt_avg_") : -4] for p in root.glob("gt_avg_*.csv"))
    if not parts:
        raise FaceLabelError([f"{root}: no gt_avg_*.csv (APPA-REAL layout)"])
    faces: list[FaceRecord] = []
    problems: list[str] = []
    for name in parts:
        gt = root / f"gt_avg_{name}.csv"
        if not gt.is_file():
            raise FaceLabelError([f"{gt}: not found"])
        extra: dict[str, dict[str, str]] = {}
        categories = root / f"allcategories_{name}.csv"
        if categories.is_file():
            extra = {row["file"].strip(): row for _, row in _read_csv(categories, ("file", "gender", "race"))}
        for where, row in _read_csv(gt, ("file_name", "real_age")):
            file = (row["file_name"] or "").strip()
            age = _parse_age((row["real_age"] or "").strip())
            before = len(problems)
            if age is None:
                problems.append(f"{where}: real_age '{row['real_age']}' is not an age in years")
            if not file or Path(file).name != file:
                problems.append(f"{where}: file_name '{file}' must be a plain file name")
            elif not (root / name / file).is_file():
                problems.append(f"{where}: image '{file}' not found in {root / name}")
            if len(problems) == before and age is not None:
                cat = extra.get(file, {})
                sex = _APPA_SEX.get((cat.get("gender") or "").strip().lower(), "")
                faces.append(FaceRecord(root / name / file, age, sex, (cat.get("race") or "").strip()))
    if problems:
        raise FaceLabelError(problems)
    return faces


def detect_layout(folder: Path) -> str:
    """Guess the layout of a folder: labels.csv, APPA-REAL CSVs, else UTKFace or AgeDB file names."""
    folder = Path(folder)
    if (folder / LABELS_FILE).is_file():
        return "labels"
    if any(folder.glob("gt_avg_*.csv")):
        return "appa"
    names = [Path(rel).name for rel in list_images(folder)[:50]] if folder.is_dir() else []
    if names and all(_utkface(n) for n in names):
        return "utkface"
    if names and all(_agedb(n) for n in names):
        return "agedb"
    raise FaceLabelError(
        [f"{folder}: unknown layout (no {LABELS_FILE}, no gt_avg_*.csv, file names not UTKFace/AgeDB)"]
    )


def load_age_faces(folder: Path, layout: str = "auto") -> list[FaceRecord]:
    """All labelled faces of a folder in one of `LAYOUTS` ("auto": `detect_layout`)."""
    layout = detect_layout(folder) if layout == "auto" else layout
    loaders: dict[str, Callable[[Path], list[FaceRecord]]] = {
        "labels": load_labelled_faces,
        "utkface": load_utkface,
        "agedb": load_agedb,
        "appa": load_appa_real,
    }
    if layout not in loaders:
        raise ValueError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    return loaders[layout](Path(folder))
