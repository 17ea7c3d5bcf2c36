"""Face alignment throughput: aligned photos per second per core, per detector back-end.

For each back-end (BlazeFace + mesh always; InsightFace SCRFD, and InsightFace's own FaceAnalysis
detection as a baseline, only with `--insightface-models DIR` holding `det_10g.onnx`) and each
data set (the 8 uncropped photos of ../shared/data/wild and a fixed seeded sample of UTKFace
chips, or the bundled demo faces when ../shared is absent) it measures

  (a) per photo, in this process pinned to one core with a warm detector: `analyse_photo`
      (decode + detect + QC + align) on photo bytes already in memory, and `decode_photo` alone,
      so detect + QC + align = the difference; median and p90 ms, photos/s on one core;
  (b) end to end, `align_photos` with workers=1 and workers=2 into fresh temporary folders
      (cold cache: hashing, detector start-up, crops and result files written), then a re-run
      on the same folder (everything cached).

Prints Markdown for docs/performance.md, with the machine, date and load average (other jobs on
the machine inflate wall times; the CPU-time column is less sensitive to them).

    python benchmarks/alignment.py [--n 300] [--seed 0] [--insightface-models DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fahr_core
from fahr_core.faces.detect import INSIGHTFACE_FILES, BlazeFaceDetector, Detector, insightface_detector
from fahr_core.faces.pipeline import align_photos, analyse_photo
from fahr_core.faces.qc import QCConfig, decode_photo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WILD_DIR = SHARED / "wild"
UTK_DIR = SHARED / "utkface" / "images"
DEMO_DIR = Path(fahr_core.__file__).resolve().parent / "demo_data" / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class PerPhoto:
    backend: str
    dataset: str
    photos: int
    decode_ms: list[float]
    work_ms: list[float]  # detect + QC + align (analyse_photo minus decode)
    total_ms: list[float]  # analyse_photo wall time
    cpu_ms: list[float]  # analyse_photo CPU time of this process
    aligned: int | None
    faces: int
    with_face: int


@dataclass
class EndToEnd:
    backend: str
    dataset: str
    photos: int
    cold1_s: float
    cold2_s: float
    cached_s: float
    aligned: int
    cached: int


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def datasets(n: int, seed: int) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """(name, paths) of each data set found, and notes on those not found."""
    found, notes = [], []
    if WILD_DIR.is_dir():
        found.append(("wild (8 uncropped)", images_in(WILD_DIR)))
    else:
        notes.append(f"wild photos: not measured ({WILD_DIR} absent)")
    if UTK_DIR.is_dir():
        pool, name = images_in(UTK_DIR), "UTKFace chips"
    else:
        pool, name = images_in(DEMO_DIR), "demo faces (no ../shared)"
    sample = sorted(random.Random(seed).sample(pool, min(n, len(pool))))
    found.append((f"{name}, {len(sample)} (seed {seed})", sample))
    return found, notes


class FaceAnalysisBaseline:
    """InsightFace's own FaceAnalysis, detection module only, from a local det_10g.onnx (no download)."""

    def __init__(self, model_dir: Path) -> None:
        from insightface.app import FaceAnalysis

        # FaceAnalysis looks in <root>/models/<name> and downloads only if that folder is missing:
        # give it a folder holding just a link to the detector file.
        self._tmp = tempfile.TemporaryDirectory(prefix="fahr-fa-")
        pack = Path(self._tmp.name) / "models" / "local"
        pack.mkdir(parents=True)
        (pack / INSIGHTFACE_FILES[0]).symlink_to(Path(model_dir).resolve() / INSIGHTFACE_FILES[0])
        self.app = FaceAnalysis(
            name="local",
            root=self._tmp.name,
            allowed_modules=["detection"],
            providers=["CPUExecutionProvider"],
        )
        self.app.prepare(ctx_id=-1, det_size=(640, 640))

    def count(self, rgb: np.ndarray) -> int:
        return len(self.app.get(np.ascontiguousarray(rgb[:, :, ::-1])))


def pin_to_one_core() -> Any:
    """Pin this process to one CPU (Linux); returns the previous affinity to restore, or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    return before


def per_photo(backend: str, detector: Detector, dataset: str, paths: list[Path], qc: QCConfig) -> PerPhoto:
    blobs = [(str(p), p.read_bytes()) for p in paths]
    analyse_photo(blobs[0][1], blobs[0][0], detector, qc)  # loads the models (warm detector)
    decode_ms, total_ms, cpu_ms = [], [], []
    aligned = faces = with_face = 0
    for name, data in blobs:
        t = time.perf_counter()
        decode_photo(data, name, qc.max_pixels)
        decode_ms.append(1000 * (time.perf_counter() - t))
        t, c = time.perf_counter(), time.process_time()
        rec, _ = analyse_photo(data, name, detector, qc)
        total_ms.append(1000 * (time.perf_counter() - t))
        cpu_ms.append(1000 * (time.process_time() - c))
        aligned += rec["status"] == "aligned"
        faces += rec["n_faces"]
        with_face += rec["n_faces"] > 0
    work_ms = [max(0.0, a - b) for a, b in zip(total_ms, decode_ms, strict=True)]
    return PerPhoto(
        backend, dataset, len(blobs), decode_ms, work_ms, total_ms, cpu_ms, aligned, faces, with_face
    )


def per_photo_baseline(fa: FaceAnalysisBaseline, dataset: str, paths: list[Path], qc: QCConfig) -> PerPhoto:
    """FaceAnalysis.get (detection only) on decoded images: no QC, no alignment."""
    images = [decode_photo(p.read_bytes(), str(p), qc.max_pixels) for p in paths]
    fa.count(images[0])
    work_ms, cpu_ms = [], []
    faces = with_face = 0
    for rgb in images:
        t, c = time.perf_counter(), time.process_time()
        k = fa.count(rgb)
        work_ms.append(1000 * (time.perf_counter() - t))
        cpu_ms.append(1000 * (time.process_time() - c))
        faces += k
        with_face += k > 0
    name = "InsightFace FaceAnalysis (detection only, baseline)"
    return PerPhoto(name, dataset, len(images), [], work_ms, work_ms, cpu_ms, None, faces, with_face)


def end_to_end(backend: str, make: Any, dataset: str, paths: list[Path], qc: QCConfig) -> EndToEnd:
    """align_photos wall time: cold with 1 and 2 workers (fresh folders, fresh detectors), then cached."""
    with tempfile.TemporaryDirectory(prefix="fahr-align-bench-") as tmp:
        t = time.perf_counter()
        align_photos(paths, Path(tmp) / "w1", make(), qc, workers=1)
        cold1 = time.perf_counter() - t
        t = time.perf_counter()
        table = align_photos(paths, Path(tmp) / "w2", make(), qc, workers=2)
        cold2 = time.perf_counter() - t
        t = time.perf_counter()
        again = align_photos(paths, Path(tmp) / "w2", make(), qc, workers=2)
        cached = time.perf_counter() - t
    return EndToEnd(backend, dataset, len(paths), cold1, cold2, cached, len(table.aligned), again.cached)


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.1f}" if values else "—"


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f}" if seconds > 0 else "—"


def markdown(pp: list[PerPhoto], e2e: list[EndToEnd], header: list[str], notes: list[str]) -> str:
    out = [*header, ""]
    out += [
        "Per photo, one process pinned to one core, warm detector, photo bytes in memory "
        "(`analyse_photo` = decode + detect + QC + align; detect+QC+align = that minus `decode_photo`):",
        "",
        "| back-end | data set | photos | decode ms (median) | detect+QC+align ms (median / p90) "
        "| total ms (median / p90) | CPU ms (median) | photos/s on one core (wall; CPU time) "
        "| aligned | faces found (photos with a face) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pp:
        aligned = "—" if r.aligned is None else f"{r.aligned}/{r.photos} ({100 * r.aligned / r.photos:.1f}%)"
        out.append(
            f"| {r.backend} | {r.dataset} | {r.photos} | {ms(r.decode_ms, 50)} "
            f"| {ms(r.work_ms, 50)} / {ms(r.work_ms, 90)} | {ms(r.total_ms, 50)} / {ms(r.total_ms, 90)} "
            f"| {ms(r.cpu_ms, 50)} | {rate(r.photos, sum(r.total_ms) / 1000)}; "
            f"{rate(r.photos, sum(r.cpu_ms) / 1000)} | {aligned} "
            f"| {r.faces} ({r.with_face}/{r.photos}) |"
        )
    out += [
        "",
        "End to end, `align_photos` from files (hashing, decoding, detector start-up in each process, "
        "PNG crops and result files written); cold = fresh folder; cached = the same call again:",
        "",
        "| back-end | data set | photos | workers=1 cold s (photos/s) | workers=2 cold s (photos/s) "
        "| speed-up 2 vs 1 | cached re-run s (photos/s) | aligned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in e2e:
        out.append(
            f"| {r.backend} | {r.dataset} | {r.photos} | {r.cold1_s:.2f} ({rate(r.photos, r.cold1_s)}) "
            f"| {r.cold2_s:.2f} ({rate(r.photos, r.cold2_s)}) | {r.cold1_s / r.cold2_s:.2f}x "
            f"| {r.cached_s:.3f} ({rate(r.photos, r.cached_s)}; {r.cached} cached) "
            f"| {r.aligned}/{r.photos} ({100 * r.aligned / r.photos:.1f}%) |"
        )
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="UTKFace chips in the sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--insightface-models", type=Path, default=None, help="folder holding det_10g.onnx")
    a = ap.parse_args()

    started = time.perf_counter()
    load_before = os.getloadavg()
    qc = QCConfig()
    sets, notes = datasets(a.n, a.seed)
    backends: list[tuple[str, Any]] = [("BlazeFace + mesh", BlazeFaceDetector)]
    baseline: FaceAnalysisBaseline | None = None
    if a.insightface_models is None:
        notes.append("InsightFace SCRFD and FaceAnalysis: not measured: no model pack here")
    else:
        mdir = a.insightface_models
        try:
            insightface_detector(mdir)  # raises if the file or the packages are missing
            backends.append(("InsightFace SCRFD (det_10g)", lambda: insightface_detector(mdir)))
            baseline = FaceAnalysisBaseline(mdir)
        except (FileNotFoundError, ImportError) as e:
            notes.append(f"InsightFace SCRFD and FaceAnalysis: not measured: no model pack here ({e})")

    pp: list[PerPhoto] = []
    restore = pin_to_one_core()
    try:
        for name, make in backends:
            detector = make()
            for ds, paths in sets:
                pp.append(per_photo(name, detector, ds, paths, qc))
                print(f"# per photo done: {name} / {ds}", file=sys.stderr, flush=True)
        if baseline is not None:
            pp += [per_photo_baseline(baseline, ds, paths, qc) for ds, paths in sets]
    finally:
        if restore is not None:
            os.sched_setaffinity(0, restore)

    e2e: list[EndToEnd] = []
    for name, make in backends:
        for ds, paths in sets:
            e2e.append(end_to_end(name, make, ds, paths, qc))
            print(f"# end to end done: {name} / {ds}", file=sys.stderr, flush=True)

    load_after = os.getloadavg()
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    header = [
        f"Machine: `{platform.node()}`, {cpus} CPUs ({usable} usable), {platform.machine()}, "
        f"Python {platform.python_version()}; date {datetime.date.today().isoformat()}; "
        f"benchmark took {time.perf_counter() - started:.0f} s.",
        "",
        f"Load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)}.",
    ]
    print(markdown(pp, e2e, header, notes))


if __name__ == "__main__":  # align_photos starts its workers with spawn
    main()
