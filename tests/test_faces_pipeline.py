"""align_photos: the bundled UTKFace sample, the wild photos, caching, and resuming a killed run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import process
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fahr_core.cohort import demo_faces_dir
from fahr_core.faces import pipeline
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.pipeline import COLUMNS, RESULTS_DIR, AlignmentTable, align_photos
from fahr_core.faces.qc import QCConfig
from tests.support import SHARED

WILD = SHARED / "wild"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector() -> BlazeFaceDetector:
    return BlazeFaceDetector()


def demo_photos() -> list[Path]:
    return sorted((demo_faces_dir() / "images").glob("*.jpg"))


@pytest.mark.slow
def test_bundled_utkface_sample_aligns(tmp_path, detector):
    """All 360 bundled faces, in two worker processes: >= 98% aligned, every rejection explained."""
    paths = demo_photos()
    assert len(paths) == 360
    ticks = []
    table = align_photos(
        paths, tmp_path, detector, QCConfig(), workers=2, progress=lambda d, t: ticks.append(d)
    )
    assert ticks == list(range(1, 361))
    assert [r.path for r in table.rows] == [str(p) for p in paths]
    assert len(table.aligned) >= 0.98 * len(paths)
    assert sum(r.n_faces == 1 for r in table.rows) >= 0.99 * len(paths)
    for r in table.rejected:
        assert r.reason and r.reason.split(":")[0] in {"blurred", "low_score", "strong_yaw", "no_face"}, r
    for r in table.aligned[:20]:
        assert np.asarray(Image.open(table.crop_path(r))).shape == (112, 112, 3)
    with table.csv_path.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    assert AlignmentTable.read(table.csv_path).rows == table.rows


@pytest.mark.slow
def test_wild_photos_table(tmp_path, detector):
    if not WILD.is_dir():
        pytest.skip(f"{WILD} is not present")
    table = align_photos(sorted(WILD.glob("*.jpg")), tmp_path, detector, QCConfig(), workers=1)
    rows = {Path(r.path).name: r for r in table.rows}
    for name in ("img5.jpg", "img6.jpg", "img8.jpg", "img10.jpg", "img11.jpg", "img12.jpg"):
        assert rows[name].status == "aligned" and rows[name].n_faces == 1, rows[name]
    assert rows["couple.jpg"].n_faces == 2 and rows["couple.jpg"].reason.startswith("several_faces:")
    assert 6 <= rows["selfie-many-people.jpg"].n_faces <= 10


CHILD = """
import os, signal, sys
from pathlib import Path
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.pipeline import align_photos

paths = [Path(p) for p in sys.argv[2:]]
def die_half_way(done, total):
    if done == total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a power cut or the OOM killer
align_photos(paths, Path(sys.argv[1]), BlazeFaceDetector(), workers=1, progress=die_half_way)
"""


def _blocked_in_child() -> int:
    """The signal mask a freshly started Python process reports, as the kernel shows it."""
    out = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/status').read().split('SigBlk:')[1].split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout, 16)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the mask from /proc")
def test_ctrl_c_while_workers_start_waits_for_them_and_is_not_lost():
    """Inside the hold a Ctrl-C neither interrupts this process nor reaches a process started
    there (it starts with SIGINT blocked); it is delivered, once, when the hold ends."""
    with pytest.raises(KeyboardInterrupt), pipeline._signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a handler that raised would do so here
        assert _blocked_in_child() & (1 << (signal.SIGINT - 1))
        reached_the_end = True
    assert reached_the_end
    assert not _blocked_in_child() & (1 << (signal.SIGINT - 1))  # and the mask is back


def test_every_signal_held_is_delivered_even_after_one_raised():
    """Ctrl-C, then SIGTERM, both while workers start, with Python's default handlers: the
    KeyboardInterrupt of the first must not swallow the second, which ends the process."""
    script = textwrap.dedent(
        """
        import os, signal
        from fahr_core.faces.pipeline import _signals_held
        try:
            with _signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass
        print("still running")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stdout, done.stderr)
    assert "still running" not in done.stdout


@pytest.mark.slow
def test_an_interrupted_pool_is_gone_before_align_returns(tmp_path, detector, monkeypatch):
    """Ctrl-C mid-pool: the workers and the pool's manager thread have ended when the exception
    leaves align_photos. A manager thread still closing its wake-up pipe at interpreter exit makes
    Python 3.11 print an EBADF traceback after the CLI's "stopped" message (seen in CI); a slow
    manager here makes that race certain."""
    slow = process._ExecutorManagerThread.join_executor_internals

    def slow_join(self):
        time.sleep(1.0)
        slow(self)

    monkeypatch.setattr(process._ExecutorManagerThread, "join_executor_internals", slow_join)

    def interrupt(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        align_photos(demo_photos()[:60], tmp_path, detector, workers=2, progress=interrupt)
    left = [t for t in threading.enumerate() if isinstance(t, process._ExecutorManagerThread)]
    assert not left
    assert len(list((tmp_path / RESULTS_DIR).iterdir())) < 60


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_work(tmp_path, detector):
    paths = demo_photos()[:20]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out), *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    finished = sorted((out / RESULTS_DIR).glob("*.json"))
    assert len(finished) == 10
    assert not (out / "alignment.csv").exists()
    before = {p: p.stat().st_mtime_ns for p in finished}
    crops_before = {p: p.stat().st_mtime_ns for p in (out / "aligned").glob("*.png")}

    resumed = align_photos(paths, out, detector, workers=1)
    assert (resumed.computed, resumed.cached) == (10, 10)
    assert {p: p.stat().st_mtime_ns for p in finished} == before  # finished photos were not redone
    assert {p: p.stat().st_mtime_ns for p in crops_before} == crops_before

    fresh = align_photos(paths, tmp_path / "fresh", detector, workers=1)
    assert resumed.csv_path.read_text() == fresh.csv_path.read_text()

    again = align_photos(paths, out, detector, workers=1)
    assert (again.computed, again.cached) == (0, 20)
    assert again.rows == resumed.rows


def test_cache_follows_content_and_settings(tmp_path, detector):
    src = demo_photos()[:3]
    copies = []
    for i, p in enumerate(src):
        copies.append(tmp_path / f"renamed_{i}.jpg")
        copies[-1].write_bytes(p.read_bytes())
    out = tmp_path / "out"
    first = align_photos(src, out, detector, workers=1)
    moved = align_photos([*copies, copies[0]], out, detector, workers=1)  # renamed files and a duplicate
    assert (moved.computed, moved.cached) == (0, 3)
    assert [r.sha256 for r in moved.rows] == [r.sha256 for r in first.rows] + [first.rows[0].sha256]
    changed = align_photos(src, out, detector, QCConfig(min_blur=25.0), workers=1)
    assert changed.computed == 3  # new thresholds, new results
    os.utime(src[0])  # touching a file changes nothing: the key is its content
    assert align_photos(src, out, detector, workers=1).computed == 0
