"""Labelled public faces (UTKFace layout) that the simulator turns into semi-synthetic patients.

The layout is a folder with `labels.csv` (`file,age,sex,race`, `file` relative to the folder)
and the images it names. A small sample ships with fahr (`demo_faces_dir()`), so the demo and the
tests run without the full data set.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fahr_core.cohort.schema import unsafe_relative_path

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ("file", "age", "sex", "race")


class FaceLabelError(ValueError):
    """A labels.csv is missing or has bad rows; `problems` names each file and line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class FaceRecord:
    """One labelled face: the image path and its (noisy) age, sex and race labels."""

    path: Path
    age: float
    sex: str  # "M" or "F"; "" where a public age data set has no sex label
    race: str = ""  # free text as the data set spells it ("" = unknown); age evaluation groups by it


def demo_faces_dir() -> Path:
    """The bundled sample of 360 adult UTKFace faces (see demo_data/README.md for the licence)."""
    return Path(__file__).resolve().parents[1] / "demo_data"


def load_labelled_faces(folder: Path) -> list[FaceRecord]:
    """Read `folder/labels.csv`; rows with an empty sex are skipped (and counted in the log).

    Raises FaceLabelError listing every bad row (non-numeric age, unknown sex, missing image,
    path leaving the folder), so a damaged label file is fixed in one go.
    """
    folder = Path(folder)
    path = folder / LABELS_FILE
    if not path.is_file():
        raise FaceLabelError([f"{path}: {LABELS_FILE} not found"])
    faces: list[FaceRecord] = []
    problems: list[str] = []
    skipped = 0
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FaceLabelError([f"{path} line 1: missing column(s) {', '.join(map(repr, missing))}"])
        for row in reader:
            where = f"{path} line {reader.line_num}"
            file = (row["file"] or "").strip()
            age_text = (row["age"] or "").strip()
            sex = (row["sex"] or "").strip()
            if not sex:
                skipped += 1
                continue
            before = len(problems)
            if sex not in ("M", "F"):
                problems.append(f"{where}: sex '{sex}' must be M, F or empty")
            try:
                age = float(age_text)
            except ValueError:
                age = math.nan
            if not 0.0 <= age <= 130.0:
                problems.append(f"{where}: age '{age_text}' is not an age in years")
            if not file:
                problems.append(f"{where}: file is empty")
            elif (why := unsafe_relative_path(file)) is not None:
                problems.append(f"{where}: file '{file}' {why}; it must be relative to {folder}")
            elif not (folder / file).is_file():
                problems.append(f"{where}: image '{file}' not found in {folder}")
            if len(problems) == before:
                race = (row["race"] or "").strip()
                faces.append(FaceRecord(path=folder / file, age=age, sex=sex, race=race))
    if problems:
        raise FaceLabelError(problems)
    if skipped:
        log.info("%s: skipped %d row(s) with an empty sex label", path, skipped)
    return faces
