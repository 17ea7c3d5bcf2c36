"""The site data contract: `cohort.csv` beside the photos it names, validated in one pass.

A site's data manager is usually not the person running fahr, so a bad file must come back with
*every* problem at once, each naming the file and line, rather than one error per attempt.
The file is read with the `csv` module and every cell is parsed explicitly: type-guessing readers
silently turn `"1.0"` sexes or `"NA"` times into something plausible, which is exactly what a
survival analysis must not do. See docs/site-data.md for the contract itself.
"""

from __future__ import annotations

import csv
import errno
import math
import os
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

COHORT_FILE = "cohort.csv"
REQUIRED_COLUMNS = ("patient_id", "photo", "time", "event", "age", "sex")
MAX_AGE = 130.0  # anything above is a typo (or a birth year), not an age; also caps age + follow-up


class CohortError(ValueError):
    """A site's cohort.csv breaks the contract; `problems` holds one message per defect."""

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = [f"{source}: {len(self.problems)} problem(s) found"] if source is not None else []
        super().__init__("\n".join(head + self.problems))


@dataclass(frozen=True)
class Patient:
    """One patient: all their photos (absolute paths) and one outcome shared by those photos."""

    patient_id: str
    photos: tuple[Path, ...]
    time: float  # follow-up in years from the photo date
    event: int  # 1 = death, 0 = censored at `time`
    age: float  # chronological age in years at the photo
    sex: str  # "M" or "F"
    covariates: dict[str, float]


@dataclass(frozen=True)
class Cohort:
    """A validated site cohort: patients in the order they first appear in cohort.csv."""

    site_dir: Path
    patients: tuple[Patient, ...]

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def patient_ids(self) -> list[str]:
        return [p.patient_id for p in self.patients]

    @property
    def time(self) -> np.ndarray:
        return np.array([p.time for p in self.patients], dtype=float)

    @property
    def event(self) -> np.ndarray:
        return np.array([p.event for p in self.patients], dtype=int)

    @property
    def age(self) -> np.ndarray:
        return np.array([p.age for p in self.patients], dtype=float)

    @property
    def is_male(self) -> np.ndarray:
        return np.array([p.sex == "M" for p in self.patients], dtype=bool)


def unsafe_relative_path(value: str) -> str | None:
    """Why `value` may not name a file inside a data folder (e.g. "is an absolute path"), or None.

    Absolute paths and `..` would let a CSV point outside its folder (another site's data, system
    files), so both are refused however the folder is later moved or mounted.
    """
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("\\"):
        return "is an absolute path"
    if PureWindowsPath(value).drive:
        return "names a drive"
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        return "contains '..'"
    return None


def _parse_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Row:
    line: int
    patient_id: str
    photo: str
    time: float
    event: int
    age: float
    sex: str
    covariates: dict[str, float]

    def outcome(self) -> tuple[float, int, float, str, tuple[tuple[str, float], ...]]:
        return self.time, self.event, self.age, self.sex, tuple(sorted(self.covariates.items()))


def _parse_row(cells: dict[str, str], line: int, site_dir: Path, problems: list[str]) -> _Row | None:
    """Check one data row, appending every defect to `problems`; a row with any defect yields None."""
    where = f"{COHORT_FILE} line {line}"
    before = len(problems)
    patient_id = cells["patient_id"]
    if not patient_id:
        problems.append(f"{where}: patient_id is empty")

    photo = cells["photo"].replace("\\", "/")
    if not photo:
        problems.append(f"{where}: photo is empty")
    elif (why := unsafe_relative_path(photo)) is not None:
        problems.append(f"{where}: photo '{cells['photo']}' {why}; it must be relative to the site folder")
    elif (why := _photo_file_problem(site_dir, photo)) is not None:
        problems.append(f"{where}: photo file '{photo}' {why}")

    time = _parse_float(cells["time"])
    if time is None:
        problems.append(f"{where}: time '{cells['time']}' is not a number")
    elif not math.isfinite(time):
        problems.append(f"{where}: time '{cells['time']}' is not a finite number")
    elif time < 0:
        problems.append(f"{where}: time '{cells['time']}' is negative")

    event = _parse_float(cells["event"])
    if event not in (0.0, 1.0):
        problems.append(f"{where}: event '{cells['event']}' must be 0 (censored) or 1 (death)")

    age = _parse_float(cells["age"])
    if age is None:
        problems.append(f"{where}: age '{cells['age']}' is not a number")
    elif not 0.0 <= age <= MAX_AGE:
        problems.append(f"{where}: age '{cells['age']}' is outside 0..{MAX_AGE:g} years")

    sex = cells["sex"]
    if sex not in ("M", "F"):
        problems.append(f"{where}: sex '{sex}' must be M or F")
    if len(problems) == before and time is not None and age is not None and age + time > MAX_AGE:
        problems.append(
            f"{where}: age {age:g} + time {time:g} is over {MAX_AGE:g} years; time must be in years "
            "(days or months?)"
        )

    covariates: dict[str, float] = {}
    for name in (c for c in cells if c not in REQUIRED_COLUMNS):
        value = _parse_float(cells[name])
        if value is None or not math.isfinite(value):
            problems.append(f"{where}: covariate '{name}' value '{cells[name]}' is not a finite number")
        else:
            covariates[name] = value

    if len(problems) > before or time is None or event is None or age is None:
        return None
    return _Row(line, patient_id, photo, time, int(event), age, sex, covariates)


def _photo_file_problem(site_dir: Path, photo: str) -> str | None:
    """Why the photo named `photo` cannot be used as a file inside `site_dir`, or None.

    A symlink may point anywhere; following it out of the folder would read (and hash into the
    alignment table) files such as /etc/shadow, so the resolved path must stay inside too.
    """
    path = site_dir / photo
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"not found (looked for {path}){_lookalike_hint(path)}"
    except PermissionError:
        return f"cannot be read: permission denied on {path} or a folder above it"
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return "has a file or folder name too long for the file system; rename it"
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return f"is a folder, not a photo file ({path})"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file ({path})"
    if not path.resolve().is_relative_to(site_dir):
        return f"leads outside the site folder (a symbolic link to {path.resolve()}); copy the photo in"
    return None


def _lookalike_hint(path: Path) -> str:
    """'; did you mean ...' when the folder holds a name equal up to Unicode normalisation or case."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return ""
    want = unicodedata.normalize("NFC", path.name)
    for name in names:
        if unicodedata.normalize("NFC", name) == want:
            return (
                f"; the folder holds '{name}', the same name with differently encoded accents "
                "(Unicode NFC/NFD): rename the file or fix the cell"
            )
    for name in names:
        if name.casefold() == path.name.casefold():
            return f"; the folder holds '{name}' (names are case-sensitive)"
    return ""


_SEPARATORS = ((";", "semicolons"), ("\t", "tabs"), ("|", "'|'"))


def _read_text(path: Path) -> str:
    """cohort.csv as text: UTF-8 (with or without byte-order mark), or a CohortError saying what to do."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CohortError([f"{path}: {COHORT_FILE} not found in the site folder"]) from None
    except IsADirectoryError:
        raise CohortError([f"{path}: is a folder; {COHORT_FILE} must be a file"]) from None
    except OSError as e:
        raise CohortError([f"{path}: cannot be read ({e.strerror or e}); check its permissions"]) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CohortError([f"{COHORT_FILE} is UTF-16 (Excel 'Unicode text'); save it as CSV UTF-8"], path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CohortError(
            [
                f"{COHORT_FILE} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (a Windows/Latin-1 "
                "export?); save the file as CSV UTF-8"
            ],
            path,
        ) from None


def _records(text: str) -> Iterator[tuple[int, list[str] | None]]:
    """(first line number, cells) per CSV record; cells None where a quote never closes.

    The csv module reports the line where a record ends; a stray quote swallows every line to the
    end of the file (or to the field-size limit), so the line where it starts is what names it.
    """
    lines = text.splitlines(keepends=True)
    reader = csv.reader(lines)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield start, None
            return
        yield start, cells


def load_cohort(site_dir: Path) -> Cohort:
    """Read and validate `site_dir/cohort.csv`; raise CohortError listing all problems found.

    Cells are stripped of surrounding whitespace; photo paths may use `/` or `\\` separators.
    """
    site_dir = Path(site_dir).resolve()
    path = site_dir / COHORT_FILE
    text = _read_text(path)
    records = _records(text)
    header = next(records, (1, None))[1]
    if header is None or not any(cell.strip() for cell in header):
        raise CohortError([f"{COHORT_FILE} line 1: file is empty (expected a header row)"], path)
    columns = [c.strip() for c in header]
    head_problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        sep = next((name for ch, name in _SEPARATORS if ch in header[0]), None) if len(header) == 1 else None
        hint = f"; the file seems to be separated by {sep}: save it comma-separated" if sep else ""
        head_problems.append(
            f"{COHORT_FILE} line 1: missing required column(s) {', '.join(repr(c) for c in missing)}{hint}"
        )
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        head_problems.append(f"{COHORT_FILE} line 1: duplicate column(s) {', '.join(map(repr, dup))}")
    if "" in columns:
        head_problems.append(f"{COHORT_FILE} line 1: column {columns.index('') + 1} has no name")
    if head_problems:
        raise CohortError(head_problems, path)

    problems: list[str] = []
    rows: list[_Row] = []
    for line, cells in records:
        where = f"{COHORT_FILE} line {line}"
        if cells is None:
            problems.append(
                f'{where}: a quote (") opens a cell that is never closed; remove the stray quote '
                "(cells with a comma or quote must be quoted, quotes inside doubled)"
            )
            break
        if not any(c.strip() for c in cells):
            continue  # blank lines (often a trailing one) carry no data
        if any("\n" in c or "\r" in c for c in cells):
            problems.append(
                f"{where}: a quoted cell runs over several lines; remove the stray quote on this line"
            )
            continue
        if len(cells) != len(columns):
            problems.append(f"{where}: has {len(cells)} fields, the header has {len(columns)}")
            continue
        stripped = {k: v.strip() for k, v in zip(columns, cells, strict=True)}
        row = _parse_row(stripped, line, site_dir, problems)
        if row is not None:
            rows.append(row)
    if not rows and not problems:
        raise CohortError([f"{COHORT_FILE}: no data rows after the header"], path)

    by_patient: dict[str, list[_Row]] = {}
    first_use_of_photo: dict[Path, _Row] = {}  # by resolved path: 'photos/a.jpg' = './photos//a.jpg'
    for row in rows:
        group = by_patient.setdefault(row.patient_id, [])
        if group and row.outcome() != group[0].outcome():
            problems.append(
                f"{COHORT_FILE} line {row.line}: patient '{row.patient_id}' has time/event/age/sex/"
                f"covariates that conflict with line {group[0].line}"
            )
        group.append(row)
        earlier = first_use_of_photo.setdefault((site_dir / row.photo).resolve(), row)
        if earlier is not row:
            same = "" if earlier.photo == row.photo else f" as '{earlier.photo}' (the same file)"
            problems.append(
                f"{COHORT_FILE} line {row.line}: photo '{row.photo}' is already listed on line "
                f"{earlier.line}{same}; each photo may be listed once"
            )
    if problems:
        raise CohortError(problems, path)

    patients = tuple(
        Patient(
            patient_id=pid,
            photos=tuple((site_dir / r.photo).resolve() for r in group),
            time=group[0].time,
            event=group[0].event,
            age=group[0].age,
            sex=group[0].sex,
            covariates=dict(group[0].covariates),
        )
        for pid, group in by_patient.items()
    )
    return Cohort(site_dir=site_dir, patients=patients)
