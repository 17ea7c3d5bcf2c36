"""Align a site's photos once: detect, quality-check, warp to 112x112, cache, resumable, parallel.

Each photo is keyed by the sha256 of its bytes plus a hash of every setting that can change the
result (detector and its model files, QC thresholds, crop size, format, code version). A finished
photo leaves `results/<key>.json` (written last and atomically, so it marks completion) and, if
aligned, `aligned/<key>.png`. A re-run finds those and redoes nothing; a killed run resumes where
it stopped; renaming or moving photos costs nothing. The table (`alignment.csv`) is removed when
a run starts and rebuilt from the per-photo results at its end, one row per input path, in input
order, so a killed run never leaves an older table looking current.

Everything written here is private to the site's account (folders 0700, files 0600): aligned
crops are patients' faces. Worker processes die with their parent (Ctrl-C, SIGTERM or SIGKILL of
the parent stops them all; see `_die_with_parent`).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fahr_core.faces import qc as rules
from fahr_core.faces.align import TEMPLATE_SIZE, align, face_region, inside_mask
from fahr_core.faces.detect import Detector, Face
from fahr_core.faces.errors import PhotoError
from fahr_core.faces.photofile import read_photo_bytes
from fahr_core.faces.qc import QCConfig, decode_photo
from fahr_core.io import PRIVATE_FILE_MODE, atomic_write_bytes, make_private_dir

ALIGNER_VERSION = "align-v1"
TABLE_FILE = "alignment.csv"
RESULTS_DIR = "results"
ALIGNED_DIR = "aligned"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class AlignmentRow:
    """One photo's outcome. Measurements are empty when the step that yields them was not reached."""

    path: str
    sha256: str
    status: str  # "aligned" or "rejected"
    reason: str  # why rejected; for aligned photos a note (e.g. which of several faces) or ""
    n_faces: int
    score: float | None
    inter_ocular_px: float | None
    yaw: float | None
    roll: float | None
    blur: float | None
    crop: str  # aligned crop, relative to the output folder ("" if rejected)


COLUMNS = tuple(f.name for f in fields(AlignmentRow))


@dataclass(frozen=True)
class AlignmentTable:
    """All rows of a run plus where they were written and how much work the run did."""

    rows: list[AlignmentRow]
    csv_path: Path
    computed: int = 0  # photos processed in this run
    cached: int = 0  # photos whose result was already there

    @property
    def aligned(self) -> list[AlignmentRow]:
        return [r for r in self.rows if r.status == "aligned"]

    @property
    def rejected(self) -> list[AlignmentRow]:
        return [r for r in self.rows if r.status != "aligned"]

    def crop_path(self, row: AlignmentRow) -> Path:
        return self.csv_path.parent / row.crop

    @classmethod
    def read(cls, csv_path: Path) -> AlignmentTable:
        """Load a table written by `align_photos`."""
        with Path(csv_path).open(newline="", encoding="utf-8") as f:
            rows = [_row_from_csv(r) for r in csv.DictReader(f)]
        return cls(rows, Path(csv_path))


def _row_from_csv(r: dict[str, str]) -> AlignmentRow:
    def num(v: str) -> float | None:
        return float(v) if v else None

    return AlignmentRow(
        path=r["path"],
        sha256=r["sha256"],
        status=r["status"],
        reason=r["reason"],
        n_faces=int(r["n_faces"] or 0),
        score=num(r["score"]),
        inter_ocular_px=num(r["inter_ocular_px"]),
        yaw=num(r["yaw"]),
        roll=num(r["roll"]),
        blur=num(r["blur"]),
        crop=r["crop"],
    )


def settings_hash(detector: Detector, qc: QCConfig, size: int, image_format: str) -> str:
    """Hash of everything besides the photo bytes that can change a result."""
    settings = {
        "version": ALIGNER_VERSION,
        "detector": detector.fingerprint,
        "qc": asdict(qc),
        "size": size,
        "format": image_format,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def analyse_photo(
    data: bytes, name: str, detector: Detector, qc: QCConfig, size: int = 112
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One photo's result record (JSON-ready) and its aligned crop (None if rejected).

    All applicable rules are evaluated and every failing one is listed, so a site sees at once
    that a photo is, say, both small and blurred.
    """
    rec: dict[str, Any] = {"status": "rejected", "reason": "", "n_faces": 0, "score": None}
    rec.update({"inter_ocular_px": None, "yaw": None, "roll": None, "blur": None})
    try:
        rgb = decode_photo(data, name, qc.max_pixels, qc.max_decode_pixels)
    except PhotoError as e:  # the result is shared by every file with these bytes: no file name in it
        rec["reason"] = f"unreadable: {str(e).removeprefix(f'{name}: ')}"
        return rec, None
    h, w = rgb.shape[:2]
    faces = detector.detect(rgb)
    padded = False
    if not faces and qc.pad_fraction > 0:
        big, border = rules.pad_image(rgb, qc.pad_fraction)
        faces = [f.shifted(-border, -border) for f in detector.detect(big)]
        padded = True
    rec["n_faces"] = len(faces)
    face, why = rules.choose_face(faces, w, h, qc)
    reasons: list[str | None] = [why]
    crop = None
    if face is not None:
        crop = _measure(rgb, face, qc, size, rec, reasons)
    notes = []
    if len(faces) > 1 and face is not None:
        notes.append(f"chose the largest central of {len(faces)} faces")
    if padded and faces:
        notes.append(f"found after padding the photo by {qc.pad_fraction:.0%}")
    grey = rules.check_grayscale(rules.colourfulness(rgb), qc)
    if grey:
        (reasons if qc.reject_grayscale else notes).append(grey)
    failed = [r for r in reasons if r]
    if failed:
        rec["reason"] = "; ".join(failed + [f"({n})" for n in notes])
        return rec, None
    rec["status"], rec["reason"] = "aligned", "; ".join(notes)
    return rec, crop


def _measure(
    rgb: np.ndarray, face: Face, qc: QCConfig, size: int, rec: dict[str, Any], reasons: list[str | None]
) -> np.ndarray:
    lm = face.landmarks
    yaw, roll = rules.yaw_ratio(lm), rules.roll_degrees(lm)
    crop = align(rgb, lm, size)
    # sharpness of the face proper at the template scale, out-of-photo pixels excluded
    crop112 = crop if size == TEMPLATE_SIZE else align(rgb, lm, TEMPLATE_SIZE)
    rows, cols = face_region()
    inside = inside_mask(rgb.shape, lm)
    blur = rules.laplacian_variance(crop112[rows, cols], inside[rows, cols])
    outside = 1.0 - float(inside[rows, cols].mean())
    rec.update(score=_r(face.score), inter_ocular_px=_r(face.inter_ocular, 2), yaw=_r(yaw), roll=_r(roll, 2))
    rec["blur"] = _r(blur, 2)
    reasons += [
        rules.check_score(face.score, qc),
        rules.check_size(face.inter_ocular, qc),
        rules.check_yaw(yaw, qc),
        rules.check_roll(roll, qc),
        rules.check_outside(outside, qc),
        rules.check_blur(blur, qc),
    ]
    return crop


# --- one photo, in a worker or in-process ---

_WORKER: dict[str, Any] = {}


def _init_worker(detector: Detector, qc: QCConfig, out_dir: Path, settings: str, size: int, fmt: str) -> None:
    """Runs once per worker process: keeps the (unpickled, lazily loaded) detector for all photos."""
    _WORKER.update(detector=detector, qc=qc, out_dir=out_dir, settings=settings, size=size, fmt=fmt)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while worker processes start; deliver them when the block ends.

    Ctrl-C reaches the whole process group. A new worker spends its first fraction of a second
    importing, before any code of ours can ignore SIGINT, and one interrupted there prints a
    traceback beside the command's own "stopped" message. A blocked signal stays blocked through
    fork and exec, so the workers start deaf to it (then ignore it for good, `_die_with_parent`).
    This process must not stop half-way through starting a worker either (one left waiting for
    its start-up data dies with a traceback of its own), and another of its threads may take the
    signal whatever this thread's mask: so in the main thread the Python handlers only note the
    signal while held, and it is raised again, to the handlers from before, when the block ends.
    """
    caught: list[int] = []

    def note(signum: int, _frame: object) -> None:
        caught.append(signum)

    # only the main thread may set handlers, and one set outside Python (None) could not be put back
    handlers = {sig: signal.getsignal(sig) for sig in _HELD_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        handlers = {}
    for sig in handlers:
        signal.signal(sig, note)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here goes to `note`
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _raise_each(list(dict.fromkeys(caught)))


def _raise_each(signums: list[int]) -> None:
    """Raise every signal in turn, even after one's handler raised (SIGINT, then a SIGTERM that kills)."""
    if signums:
        try:
            signal.raise_signal(signums[0])
        finally:
            _raise_each(signums[1:])


def _die_with_parent(parent: int, *init_args: Any) -> None:
    """Worker initializer: never outlive the aligning process, leave Ctrl-C to it, then `_init_worker`.

    Ctrl-C reaches the whole process group; the parent alone decides how to stop (it kills the
    workers), so workers ignore SIGINT instead of each printing a traceback. If the parent dies
    without cleaning up (SIGKILL, OOM killer), Linux kills the worker (PR_SET_PDEATHSIG); elsewhere
    a thread polls the parent id. A parent that died before this ran is caught by getppid().
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C held since its start is dropped here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)
    linux = sys.platform.startswith("linux")
    if linux:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    if not linux:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    _init_worker(*init_args)


def _process(path: str, key: str) -> dict[str, Any]:
    """Analyse one photo and persist its crop, then its result record (the completion marker)."""
    w = _WORKER
    out_dir: Path = w["out_dir"]
    try:
        data = read_photo_bytes(Path(path))
    except PhotoError as e:  # not persisted: the file may be readable (or smaller) next time
        return {"status": "rejected", "reason": f"unreadable: {e}"}
    sha = hashlib.sha256(data).hexdigest()
    try:
        rec, crop = analyse_photo(data, path, w["detector"], w["qc"], w["size"])
    except Exception as e:  # a bug or a detector failure: recorded, not persisted, retried next run
        return {"status": "rejected", "reason": f"error: {type(e).__name__}: {e}", "sha256": sha}
    rec["sha256"] = sha
    rec["settings"] = w["settings"]
    rec["crop"] = ""
    if crop is not None:
        rel = f"{ALIGNED_DIR}/{sha}-{w['settings']}.{w['fmt']}"
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="PNG" if w["fmt"] == "png" else "JPEG", quality=95)
        atomic_write_bytes(out_dir / rel, buf.getvalue(), PRIVATE_FILE_MODE)
        rec["crop"] = rel
    if sha == key.split("-")[0]:  # the file did not change since it was hashed
        result = (json.dumps(rec, sort_keys=True) + "\n").encode()
        atomic_write_bytes(out_dir / RESULTS_DIR / f"{key}.json", result, PRIVATE_FILE_MODE)
    return rec


def align_photos(
    paths: Sequence[Path],
    out_dir: Path,
    detector: Detector,
    qc: QCConfig | None = None,
    workers: int | None = None,
    size: int = 112,
    image_format: str = "png",
    progress: Progress | None = None,
) -> AlignmentTable:
    """Align every photo into `out_dir` and write `out_dir/alignment.csv`; see the module doc.

    `workers` processes (default: all CPUs; 1 runs in this process) each build their own detector
    once. `progress(done, total)` is called after each photo, cached ones included.
    """
    qc = qc or QCConfig()
    if image_format not in ("png", "jpg"):
        raise ValueError("image_format must be 'png' or 'jpg'")
    out_dir = Path(out_dir)
    for folder in (out_dir, out_dir / RESULTS_DIR, out_dir / ALIGNED_DIR):
        make_private_dir(folder)
    (out_dir / TABLE_FILE).unlink(missing_ok=True)  # until this run completes there is no table
    settings = settings_hash(detector, qc, size, image_format)
    names = [str(p) for p in paths]
    total = len(names)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # Cache look-up by content: hash each file (unreadable files are processed to get their reason).
    keys: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    todo: dict[str, str] = {}  # key -> one path with these bytes
    cached = 0
    for p in names:
        try:
            key = f"{_sha256_file(Path(p))}-{settings}"
        except OSError:
            key = f"unreadable:{p}"  # processed (to get its reason), never cached
        keys[p] = key
        if key in records or key in todo:
            continue
        record = None if key.startswith("unreadable:") else _cached(out_dir / RESULTS_DIR / f"{key}.json")
        if record is not None:
            records[key] = record
            cached += 1
        else:
            todo[key] = p
    for p in names:
        if keys[p] in records:
            tick()

    init_args = (detector, qc, out_dir, settings, size, image_format)
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    waiting = {k: [p for p in names if keys[p] == k] for k in todo}
    if n_workers == 1:
        _init_worker(*init_args)
        for key, p in todo.items():
            records[key] = _process(p, key)
            for _ in waiting[key]:
                tick()
    elif todo:
        # spawn, not fork: the parent may hold threads (torch, progress bars) that fork would copy mid-lock
        ctx = multiprocessing.get_context("spawn")
        ex: ProcessPoolExecutor | None = None
        futures: dict = {}
        try:
            # the constructor starts multiprocessing's resource tracker, which holds Ctrl-C back
            # from it the same way and then lets it through again: so outside the hold
            ex = ProcessPoolExecutor(
                n_workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(), *init_args)
            )
            with _signals_held():  # the workers start in the first submits
                futures = {ex.submit(_process, p, key): key for key, p in todo.items()}
            for fut in as_completed(futures):
                key = futures[fut]
                records[key] = fut.result()
                for _ in waiting[key]:
                    tick()
            ex.shutdown()
        except BaseException:  # Ctrl-C, SIGTERM (the CLI raises KeyboardInterrupt), a broken pool
            if ex is not None:
                _stop_now(ex)
            raise

    rows = [_row(p, records[keys[p]]) for p in names]
    csv_path = out_dir / TABLE_FILE
    atomic_write_bytes(csv_path, _to_csv(rows).encode(), PRIVATE_FILE_MODE)
    return AlignmentTable(rows, csv_path, computed=len(todo), cached=cached)


def _cached(result: Path) -> dict[str, Any] | None:
    """A finished photo's record, or None if there is none or it is damaged (then it is redone)."""
    try:
        record = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "status" in record else None


def _stop_now(ex: ProcessPoolExecutor) -> None:
    """Stop a pool at once: queued photos are dropped and the workers killed, not drained.

    `shutdown(wait=True)`, which leaving a `with` block does, would finish every queued photo first
    (minutes after Ctrl-C). Python 3.14 has `kill_workers()`; before it, the pool's process table
    is the only handle on the workers. Results already written stay valid: the next run resumes.

    It returns only after the pool's manager thread has ended: that thread closes its wake-up pipe
    when it sees the workers die, and if it is still doing so when the interpreter exits, Python
    3.11's exit hook writes to the pipe being closed and prints a traceback (EBADF) after the
    command's "stopped" message. Queued photos are cancelled by that thread (`cancel_futures`):
    cancelling them from here as well raced with it marking them failed when the workers died
    (InvalidStateError in that thread).
    """
    workers = list((getattr(ex, "_processes", None) or {}).values())
    manager = getattr(ex, "_executor_manager_thread", None)
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        proc.kill()
    for proc in workers:
        proc.join(timeout=5)
    if manager is not None:
        manager.join(timeout=10)


def _row(path: str, rec: dict[str, Any]) -> AlignmentRow:
    return AlignmentRow(
        path=path,
        sha256=rec.get("sha256", ""),
        status=rec["status"],
        reason=rec.get("reason", ""),
        n_faces=int(rec.get("n_faces", 0)),
        score=rec.get("score"),
        inter_ocular_px=rec.get("inter_ocular_px"),
        yaw=rec.get("yaw"),
        roll=rec.get("roll"),
        blur=rec.get("blur"),
        crop=rec.get("crop", ""),
    )


def _to_csv(rows: list[AlignmentRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if v is None else v for v in (getattr(r, c) for c in COLUMNS)])
    return buf.getvalue()


def alignment_summary(table: AlignmentTable, patients_dropped: int = 0) -> dict[str, Any]:
    """Counts for a site report: photos, aligned, rejections by kind (the text before ':')."""
    rejected: dict[str, int] = {}
    for row in table.rejected:
        kind = row.reason.split(":", 1)[0].strip() or "unknown"
        rejected[kind] = rejected.get(kind, 0) + 1
    return {
        "photos": len(table.rows),
        "aligned": len(table.aligned),
        "rejected": dict(sorted(rejected.items())),
        "patients_without_aligned_photo": patients_dropped,
    }
