"""A careless or hostile site operator (issue 14): every bad input is named on one line, no traceback.

Each test is one case of the corpus an IT person tried against `fahr-client check|align`, `fahr
certs` and `fahr cohort simulate` on a simulated site; the numbers refer to the issue's defects.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from typer.testing import CliRunner

from fahr_client.cli import app as client_app
from fahr_core.cohort import demo_faces_dir, load_cohort, split_patients
from fahr_core.config import ConfigError, load_site_config
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.errors import PhotoError
from fahr_core.faces.photofile import MAX_PHOTO_BYTES
from fahr_core.faces.pipeline import RESULTS_DIR, TABLE_FILE, align_photos
from fahr_core.faces.qc import decode_photo
from fahr_core.workdir import SITE_WORKDIR
from fahr_research.cli import app as research_app

runner = CliRunner()
DEMO = sorted((demo_faces_dir() / "images").glob("*.jpg"))
HEADER = ["patient_id", "photo", "time", "event", "age", "sex"]


@pytest.fixture(autouse=True)
def _restore_umask():
    """fahr-client sets umask 077 for its process; give the test process its own back."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


def write_site(root: Path, rows: list[list[str]], toml_extra: str = "", n_photos: int = 6) -> Path:
    """A site folder with real demo photos photos/p<i>.jpg, cohort.csv from `rows`; returns site.toml."""
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(DEMO[:n_photos]):
        shutil.copyfile(src, root / "photos" / f"p{i}.jpg")
    with (root / "cohort.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([HEADER, *rows])
    toml = root / "site.toml"
    toml.write_text(f'[site]\nname = "s"\ndata = "."\n{toml_extra}')
    return toml


def rows(n: int = 6) -> list[list[str]]:
    """n patients, one photo each, alternating events, plausible ages and follow-up."""
    return [[f"P{i}", f"photos/p{i}.jpg", str(1 + i), str(i % 2), str(40 + i), "MF"[i % 2]] for i in range(n)]


def check(toml: Path, *extra: str):
    return runner.invoke(client_app, ["check", "--site", "s", "--config", str(toml), *extra])


def assert_named(result, code: int, *needles: str) -> None:
    """Non-zero exit `code`, each needle in stderr, and no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert (
        "Traceback" not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    ), result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_good_site_passes_check(tmp_path):
    result = check(write_site(tmp_path, rows()))
    assert result.exit_code == 0, result.output
    assert "6 patients, 6 photos" in result.stdout


# --- 1: one photo, one identity, however the path is spelled ---


@pytest.mark.parametrize(
    "spelling", ["./photos/p0.jpg", "photos//p0.jpg", "photos/./p0.jpg", "photos\\p0.jpg"]
)
def test_the_same_photo_spelled_differently_is_one_photo(tmp_path, spelling):
    r = rows()
    r[3][1] = spelling
    assert_named(check(write_site(tmp_path, r)), 1, "cohort.csv line 5", "already listed on line 2")


def test_a_symlink_to_another_photo_is_the_same_photo(tmp_path):
    toml = write_site(tmp_path, rows())
    (tmp_path / "photos" / "alias.jpg").symlink_to(tmp_path / "photos" / "p0.jpg")
    r = rows()
    r[3][1] = "photos/alias.jpg"
    toml = write_site(tmp_path, r)
    assert_named(check(toml), 1, "line 5", "already listed on line 2")


def test_the_same_face_in_two_files_for_two_patients_is_an_error(tmp_path):
    toml = write_site(tmp_path, rows())
    shutil.copyfile(tmp_path / "photos" / "p0.jpg", tmp_path / "photos" / "p3.jpg")
    assert_named(
        check(toml), 1, "photos/p3.jpg (patient P3) has the same content as photos/p0.jpg (patient P0)"
    )


def test_a_copied_photo_of_the_same_patient_is_a_named_warning(tmp_path):
    r = rows()
    r.append(["P0", "photos/p5b.jpg", "1", "0", "40", "M"])
    toml = write_site(tmp_path, r)
    shutil.copyfile(tmp_path / "photos" / "p0.jpg", tmp_path / "photos" / "p5b.jpg")
    result = check(toml)
    assert result.exit_code == 0, result.output
    assert "warning: photo photos/p5b.jpg is a copy of photos/p0.jpg" in result.stderr


# --- 2: tracebacks become named problems ---


def test_utf16_and_cp1252_cohorts_are_named(tmp_path):
    toml = write_site(tmp_path, rows())
    text = (tmp_path / "cohort.csv").read_text()
    (tmp_path / "cohort.csv").write_bytes(text.encode("utf-16"))
    assert_named(check(toml), 1, "UTF-16", "save it as CSV UTF-8")
    lines = text.splitlines()
    lines[3] = lines[3].replace("P2", "Jos\xe9")
    (tmp_path / "cohort.csv").write_bytes("\n".join(lines).encode("cp1252"))
    assert_named(check(toml), 1, "cohort.csv line 4", "not UTF-8")


@pytest.mark.parametrize("filler", [20, 100_000])
def test_a_stray_quote_is_named_at_its_own_line(tmp_path, filler):
    toml = write_site(tmp_path, rows())
    text = (tmp_path / "cohort.csv").read_text()
    (tmp_path / "cohort.csv").write_text(text.replace("\nP2,", '\n"P2,'))  # line 4: a quote never closed
    with (tmp_path / "cohort.csv").open("a") as f:
        f.writelines(f"Q{i},photos/p1.jpg,1,0,40,M\n" for i in range(filler))
    assert_named(check(toml), 1, "cohort.csv line 4", "quote")


def test_long_names_folders_and_unreadable_files_are_named(tmp_path):
    r = rows()
    r[1][1] = "photos/" + "x" * 300 + ".jpg"
    r[2][1] = "photos"
    toml = write_site(tmp_path, r)
    result = check(toml)
    assert_named(result, 1, "line 3", "name too long", "line 4", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_cohort_and_photo_folder_are_named(tmp_path):
    toml = write_site(tmp_path, rows())
    (tmp_path / "photos").chmod(0)
    try:
        assert_named(check(toml), 1, "permission denied")
    finally:
        (tmp_path / "photos").chmod(0o700)
    (tmp_path / "cohort.csv").chmod(0)
    assert_named(check(toml), 1, "cohort.csv", "cannot be read")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[site]\nname = "s"\ndata = "."\nsplit_seed = "abc"\n', "[site].split_seed must be a whole number"),
        (
            '[site]\nname = "s"\ndata = "."\ntest_fraction = "thirty"\n',
            "[site].test_fraction must be a number",
        ),
        ('site = "alpha"\n', "'site' must be a table"),
        ('privacy = 3\n[site]\nname = "s"\ndata = "."\n', "'privacy' must be a table"),
        ('[site]\nname = "s"\ndata = "."\n[alignment]\ndetector = "insightface"\n', "[alignment].model_dir"),
        # what trains is the server's choice ([model].finetune): a site cannot set it
        ('[site]\nname = "s"\ndata = "."\n[train]\ntrainable = "all"\n', "unknown key(s) trainable"),
        ('[site]\nname = "s"\ndata = "."\n[train]\nthreads = -4\n', "[train].threads"),
        ('[site]\nname = "s"\ndata = "."\n[train]\nclipping = "fast"\n', "[train].clipping is 'fast'"),
        ('[site]\nname = "s"\ndata = "."\n[alignment]\nworkers = -1\n', "[alignment].workers"),
        ('[site]\nname = "s"\ndata = "."\n[connection]\nsuperlink = "fahr.example.org"\n', "superlink"),
        ('[site]\nname = "s"\ndata = "."\n[connection]\nsuperlink = "h:99999"\n', "superlink"),
        # 4: settings that void DP
        ('[site]\nname = "s"\ndata = "."\n[privacy]\nepsilon = inf\n', "[privacy].epsilon"),
        ('[site]\nname = "s"\ndata = "."\n[privacy]\nmax_grad_norm = inf\n', "[privacy].max_grad_norm"),
        ('[site]\nname = "s"\ndata = "."\n[privacy]\ndelta = nan\n', "[privacy].delta"),
        ('[site]\nname = "s"\ndata = "."\n[train]\nlr = inf\n', "[train].lr"),
        ('[site]\nname = "s"\ndata = "."\n[train]\nlevel_lr = 0\n', "[train].level_lr"),
        ('[site]\nname = "s"\ndata = "."\n[train]\nweight_decay = -0.1\n', "[train].weight_decay"),
    ],
)
def test_bad_site_toml_values_name_the_key(tmp_path, text, needle):
    toml = write_site(tmp_path, rows())
    toml.write_text(text)
    assert_named(check(toml), 2, str(toml), needle)


def test_config_that_is_a_folder_utf16_or_has_a_bom(tmp_path):
    toml = write_site(tmp_path, rows())
    assert_named(check(tmp_path), 2, "is a folder")
    text = toml.read_text()
    toml.write_bytes(text.encode("utf-16"))
    assert_named(check(toml), 2, "UTF-16")
    toml.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Notepad's byte-order mark is fine
    assert check(toml).exit_code == 0


def test_insightface_without_its_model_file_is_a_check_problem(tmp_path):
    (tmp_path / "models").mkdir()
    toml = write_site(tmp_path, rows(), '[alignment]\ndetector = "insightface"\nmodel_dir = "models"\n')
    assert_named(check(toml), 1, "[alignment].model_dir", "lacks det_10g.onnx")


def test_simulate_with_uneven_per_site_options_is_one_line(tmp_path):
    result = runner.invoke(research_app, ["cohort", "simulate", "--out", str(tmp_path), "--sizes", "20"])
    assert_named(result, 2, "--sizes names 1 site(s) but --mean-ages has 3 and --rates has 3 value(s)")


# --- 3: check looks at every photo and every file start needs ---


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty (0 bytes)"),
        (b"patient notes, not a photo\n", "is not an image file"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "PostScript"),
        ("truncated", "corrupt or truncated"),
    ],
)
def test_check_reads_every_photo(tmp_path, content, needle):
    toml = write_site(tmp_path, rows())
    photo = tmp_path / "photos" / "p2.jpg"
    photo.write_bytes(photo.read_bytes()[:2000] if content == "truncated" else content)
    assert_named(check(toml), 1, "photo photos/p2.jpg", needle)


def test_a_photo_over_the_size_cap_is_refused_unread(tmp_path):
    toml = write_site(tmp_path, rows())
    with (tmp_path / "photos" / "p2.jpg").open("r+b") as f:
        f.truncate(MAX_PHOTO_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    assert_named(check(toml), 1, "photos/p2.jpg", "MB limit for a photo")


def test_missing_tls_files_are_check_problems(tmp_path):
    extra = '[connection]\nsuperlink = "h.org:8000"\nroot_certificates = "ca.crt"\nauth_key = "s.key"\n'
    toml = write_site(tmp_path, rows(), extra)
    assert_named(check(toml), 1, "[connection].root_certificates", "[connection].auth_key")


# --- 4: privacy settings against their meaning ---


def test_delta_must_be_below_one_over_the_training_split(tmp_path):
    toml = write_site(tmp_path, rows(12), n_photos=12)
    cfg = load_site_config(toml)
    n = len(split_patients(load_cohort(cfg.data), cfg.test_fraction, cfg.split_seed)[0])
    for delta, ok in ((0.99 / n, True), (1.0 / n, False), (0.5, False), (0.9, False)):
        toml.write_text(f'[site]\nname = "s"\ndata = "."\n[privacy]\ndelta = {delta!r}\n')
        if ok:
            assert check(toml).exit_code == 0
        else:
            assert_named(check(toml), 1, f"[privacy].delta = {delta:g}", f"1/n = 1/{n}")


def test_a_split_with_an_empty_side_is_a_check_problem(tmp_path):
    toml = write_site(tmp_path, rows(2))
    toml.write_text(toml.read_text() + "test_fraction = 0.01\n")
    assert_named(
        check(toml), 1, "[site].test_fraction = 0.01 splits the 2 patients into 2 for training and 0"
    )


def test_a_huge_epsilon_is_a_named_warning(tmp_path):
    toml = write_site(tmp_path, rows(), "[privacy]\nepsilon = 1e9\n")
    result = check(toml)
    assert result.exit_code == 0
    assert "warning: [privacy].epsilon = 1e+09 is above 10" in result.stderr
    toml.write_text('[site]\nname = "s"\ndata = "."\n[privacy]\nepsilon = 10.0\n')
    assert "warning" not in check(toml).stderr


# --- 7: Pillow never picks the format ---


def test_a_postscript_file_never_reaches_ghostscript(tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake_gs))
    ps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath 0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(PhotoError, match="PostScript"):
        decode_photo(ps, "evil.jpg")
    assert not marker.exists()


def test_huge_jpegs_are_decoded_at_a_reduced_scale():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), np.uint8)).save(buf, "JPEG")
    full = decode_photo(buf.getvalue(), "big.jpg")
    assert full.shape == (1200, 1600, 3)
    # the first of 1/2, 1/4, 1/8 within the limit: 800x600 = 480,000 pixels; 400x300 = 120,000
    assert decode_photo(buf.getvalue(), "big.jpg", max_decode_pixels=500_000).shape == (600, 800, 3)
    assert decode_photo(buf.getvalue(), "big.jpg", max_decode_pixels=200_000).shape == (300, 400, 3)


# --- 9: implausible cohorts ---


def test_followup_in_days_zero_events_and_one_patient(tmp_path):
    r = rows()
    r[1][2] = "3652"
    assert_named(check(write_site(tmp_path, r)), 1, "line 3", "time must be in years")
    r = rows()
    for row in r:
        row[3] = "0"
    assert_named(check(write_site(tmp_path, r)), 1, "no patient has event = 1")
    assert_named(check(write_site(tmp_path, rows(1))), 1, "1 patient(s); a site needs at least 2")


# --- 10: nothing outside the site folder ---


def test_a_symlink_out_of_the_folder_is_refused_and_never_hashed(tmp_path):
    outside = tmp_path / "secret.jpg"
    shutil.copyfile(DEMO[10], outside)
    site = tmp_path / "site"
    r = rows()
    r[2][1] = "photos/link.jpg"
    toml = write_site(site, r)
    (site / "photos" / "link.jpg").symlink_to(outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    assert_named(check(toml), 1, "line 4", "leads outside the site folder")
    result = runner.invoke(client_app, ["align", "--site", "s", "--config", str(toml)])
    assert_named(result, 1, "leads outside the site folder")
    written = [p.read_bytes() for p in site.rglob("*") if p.is_file() and SITE_WORKDIR in p.parts]
    assert not any(digest.encode() in b for b in written)
    etc = site / "photos" / "passwd.jpg"
    etc.symlink_to("/etc/passwd")
    r[2][1] = "photos/passwd.jpg"
    assert_named(check(write_site(site, r)), 1, "leads outside the site folder")


# --- 11: messages that say what is wrong ---


def test_nfd_name_semicolons_and_tabs_get_a_hint(tmp_path):
    nfc = unicodedata.normalize("NFC", "José.jpg")
    r = rows()
    r[2][1] = f"photos/{nfc}"
    toml = write_site(tmp_path, r)
    shutil.copyfile(DEMO[20], tmp_path / "photos" / unicodedata.normalize("NFD", "José.jpg"))
    assert_named(check(toml), 1, "line 4", "differently encoded accents")
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        (tmp_path / "cohort.csv").write_text("\n".join(sep.join(x) for x in [HEADER, *rows()]) + "\n")
        assert_named(check(toml), 1, f"separated by {name}")


@pytest.fixture(scope="module")
def detector() -> BlazeFaceDetector:
    return BlazeFaceDetector()


def test_photos_with_the_same_bytes_do_not_name_each_other(tmp_path, detector):
    a, b = tmp_path / "first.jpg", tmp_path / "second.jpg"
    a.write_bytes(DEMO[0].read_bytes()[:3000])
    shutil.copyfile(a, b)
    table = align_photos([a, b], tmp_path / "out", detector, workers=1)
    assert [r.status for r in table.rows] == ["rejected", "rejected"]
    assert "truncated" in table.rows[1].reason and "first.jpg" not in table.rows[1].reason


# --- 12 and 6: results that say whether the site can train, private and never stale ---


def test_damaged_cache_results_are_redone_and_a_killed_run_leaves_no_table(tmp_path, detector):
    photos = [tmp_path / f"p{i}.jpg" for i in range(3)]
    for p, src in zip(photos, DEMO, strict=False):
        shutil.copyfile(src, p)
    out = tmp_path / "out"
    os.umask(0o022)  # the library keeps crops private whatever the umask of its caller
    align_photos(photos, out, detector, workers=1)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert all(m == (0o700 if p.is_dir() else 0o600) for p, m in modes.items()), modes
    for result in (out / RESULTS_DIR).iterdir():
        result.write_text("" if result.name < "8" else "{")
    table = align_photos(photos, out, detector, workers=1)
    assert table.computed == 3 and len(table.aligned) == 3

    def interrupt(done, total):
        raise KeyboardInterrupt

    (out / RESULTS_DIR / next(iter(os.listdir(out / RESULTS_DIR)))).unlink()
    with pytest.raises(KeyboardInterrupt):
        align_photos(photos, out, detector, workers=1, progress=interrupt)
    assert not (out / TABLE_FILE).exists()


def test_align_exits_non_zero_when_no_photo_aligns_and_writes_privately(tmp_path):
    toml = write_site(tmp_path, rows())
    for i in range(6):  # real JPEGs without a face: check passes, alignment rejects them all
        grey = np.full((200, 200, 3), 60 + 20 * i, np.uint8)
        Image.fromarray(grey).save(tmp_path / "photos" / f"p{i}.jpg", quality=90)
    toml.write_text(toml.read_text() + "[alignment]\nworkers = 1\n")
    os.umask(0o022)
    result = runner.invoke(client_app, ["align", "--site", "s", "--config", str(toml)])
    assert_named(result, 1, "site s cannot train: 0 patient(s) have an aligned photo")
    state = tmp_path / SITE_WORKDIR
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*")]}
    assert modes and all(m == (0o700 if p.is_dir() else 0o600) for p, m in modes.items()), modes


def test_load_cohort_keeps_resolved_photo_paths(tmp_path):
    toml = write_site(tmp_path, rows())
    cohort = load_cohort(load_site_config(toml).data)
    assert cohort.patients[0].photos == ((tmp_path / "photos" / "p0.jpg").resolve(),)


def test_config_error_is_a_config_error(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[site]\nname = "s"\ndata = "."\n[privacy]\nepsilon = nan\n')
    with pytest.raises(ConfigError, match=r"\[privacy\]\.epsilon must be a finite number > 0"):
        load_site_config(path)


# --- 8: keys ---


def certs(*args: str):
    return runner.invoke(research_app, ["certs", *args])


def test_site_keys_are_never_overwritten_without_force(tmp_path):
    assert certs("site", "--out", str(tmp_path), "--site", "maastro").exit_code == 0
    key = tmp_path / "maastro.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    assert_named(certs("site", "--out", str(tmp_path), "--site", "maastro"), 2, "maastro.key", "--force")
    assert key.read_bytes() == before
    assert certs("site", "--out", str(tmp_path), "--site", "maastro", "--force").exit_code == 0
    assert key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_ca_is_never_replaced_without_force(tmp_path):
    assert certs("init", "--out", str(tmp_path)).exit_code == 0
    ca = (tmp_path / "ca.key").read_bytes()
    assert_named(certs("init", "--out", str(tmp_path)), 2, "ca.key", "--force")
    assert (tmp_path / "ca.key").read_bytes() == ca
    assert {p.name: stat.S_IMODE(p.stat().st_mode) & 0o077 for p in tmp_path.glob("*.key")} == {
        "ca.key": 0,
        "server.key": 0,
    }


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "", ".hidden", "a/b", "x" * 65])
def test_site_names_that_are_not_file_names_are_refused(tmp_path, name):
    out = tmp_path / "keys"
    assert_named(certs("site", "--out", str(out), "--site", name), 2, "site name")
    assert not list(tmp_path.rglob("*.key")) and not Path("/tmp/abs.key").exists()


def test_a_private_key_is_never_readable_by_others_even_briefly(tmp_path, monkeypatch):
    modes = {}
    link = os.link

    def watching_link(src, dst, *a, **kw):
        modes[Path(dst).name] = stat.S_IMODE(os.stat(src).st_mode)
        return link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", watching_link)
    os.umask(0o022)
    assert certs("site", "--out", str(tmp_path), "--site", "s1").exit_code == 0
    assert modes["s1.key"] == 0o600 and modes["s1.pub"] == 0o644


# --- 5: alignment stops when told, with any number of workers, and leaves nothing behind ---

FAHR_CLIENT = Path(sys.executable).with_name("fahr-client")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def descendants(pid: int) -> set[int]:
    kids, found, todo = _children(), set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, limit_s: float) -> bool:
    """Poll `condition` for at most `limit_s` (a bound against hanging, not a measurement)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def busy_site(tmp_path) -> Path:
    """120 patients, 2 alignment workers: minutes of work on a shared CPU."""
    n = 120
    r = [
        [f"P{i}", f"photos/p{i}.jpg", str(1 + i % 9), str(i % 2), str(30 + i % 40), "MF"[i % 2]]
        for i in range(n)
    ]
    toml = write_site(tmp_path, r, "[alignment]\nworkers = 2\n", n_photos=n)
    return toml


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c twice", "ctrl-c as workers start", "sigterm", "sigkill"])
def test_align_stops_when_told_and_leaves_no_worker(busy_site, how):
    """Every way an operator stops `align` ends it at once, with its one-line message and no worker
    left. "as workers start": the group's Ctrl-C lands while the new workers are still importing,
    before any code of theirs runs (each printed a KeyboardInterrupt traceback once)."""
    results = busy_site.parent / SITE_WORKDIR / "aligned" / RESULTS_DIR
    log = busy_site.parent / "align.log"  # a file, not a pipe: an orphaned worker would hold a pipe open
    proc = subprocess.Popen(
        [str(FAHR_CLIENT), "align", "--site", "s", "--config", str(busy_site)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    try:
        if how == "ctrl-c as workers start":
            # the resource tracker and a worker: its imports before our initializer last ~0.3 s
            while len(descendants(proc.pid)) < 2:
                assert proc.poll() is None, "align ended before starting its workers"
                time.sleep(0.005)
        else:
            assert wait_until(lambda: results.is_dir() and any(results.iterdir()), 300), "no photo aligned"
        workers = descendants(proc.pid)
        assert len(workers) >= 2
        if how.startswith("ctrl-c"):
            os.killpg(proc.pid, signal.SIGINT)  # a terminal sends Ctrl-C to the whole group
            if how == "ctrl-c twice":
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = proc.wait(timeout=60)
        err = log.read_text()
        assert wait_until(lambda: not any(alive(p) for p in workers), 30), [p for p in workers if alive(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(results.iterdir())) if results.is_dir() else 0
    assert done < 120, "the queue was drained after the signal"
    assert not (results.parent / TABLE_FILE).exists()
    if how == "sigkill":
        assert code == -signal.SIGKILL
    else:
        assert code == 130, err
        assert "alignment stopped" in err and "Traceback" not in err, err


def test_an_unwritable_site_state_folder_is_one_line(tmp_path):
    toml = write_site(tmp_path, rows())
    toml.write_text(toml.read_text().replace('data = "."', 'data = "."\nworkdir = "cohort.csv/state"'))
    result = runner.invoke(client_app, ["align", "--site", "s", "--config", str(toml)])
    assert_named(result, 1, "cohort.csv/state", "this account may write there")
    debug = runner.invoke(client_app, ["--debug", "align", "--site", "s", "--config", str(toml)])
    assert isinstance(debug.exception, NotADirectoryError)  # --debug: the real error, traceback and all
