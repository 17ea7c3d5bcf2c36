"""Decoding gate and quality rules on hostile and awkward files made from a real face."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fahr_core.cohort import demo_faces_dir
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.errors import PhotoError
from fahr_core.faces.images import PhotoError as PublicPhotoError
from fahr_core.faces.pipeline import align_photos
from fahr_core.faces.qc import QCConfig, decode_photo, read_photo, roll_degrees, yaw_ratio


@pytest.fixture(scope="module")
def detector() -> BlazeFaceDetector:
    return BlazeFaceDetector()


@pytest.fixture(scope="module")
def face() -> Image.Image:
    """A real colour face from the bundled UTKFace sample, upscaled to a 300x300 'photo'."""
    path = sorted((demo_faces_dir() / "images").glob("*.jpg"))[1]
    return Image.open(path).convert("RGB").resize((300, 300), Image.BICUBIC)


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_photo_error_is_the_public_one():
    assert PhotoError is PublicPhotoError


def test_hostile_and_awkward_files_each_get_the_right_outcome(tmp_path, face, detector):
    src = tmp_path / "src"
    src.mkdir()
    jpeg = io.BytesIO()
    face.save(jpeg, format="JPEG", quality=95)
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    (src / "random.jpg").write_bytes(
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    )
    (src / "bomb.png").write_bytes(png_with_size(100_000, 100_000))
    (src / "empty.jpg").write_bytes(b"")
    save(face.convert("CMYK"), src / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save(Image.fromarray(grey16), src / "sixteen.png")
    save(face.convert("P", palette=Image.ADAPTIVE, colors=256), src / "palette.png")
    rgba = face.convert("RGBA")
    alpha = np.full((300, 300), 255, np.uint8)
    alpha[:20] = 0  # transparent top band
    rgba.putalpha(Image.fromarray(alpha))
    save(rgba, src / "rgba.png")
    save(face.convert("L"), src / "grey.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    save(face.rotate(90, expand=True), src / "exif_rotated.jpg", quality=95, exif=exif)
    save(face.filter(ImageFilter.GaussianBlur(6)), src / "blurred.jpg", quality=95)
    save(Image.fromarray(np.full((300, 300, 3), 90, np.uint8)), src / "no_face.jpg")
    save(face, src / "good.jpg", quality=95)

    paths = sorted(src.iterdir())
    table = align_photos(paths, tmp_path / "out", detector, QCConfig(), workers=1)
    rows = {Path(r.path).name: r for r in table.rows}
    assert len(rows) == len(paths)
    for r in table.rows:
        assert r.status in ("aligned", "rejected")
        if r.status == "rejected":
            assert r.reason

    def rejected(name: str, *words: str) -> None:  # the row names the file, the shared reason does not
        r = rows[name]
        assert r.status == "rejected", (name, r.reason)
        for w in words:
            assert w in r.reason, (name, r.reason)

    rejected("truncated.jpg", "unreadable:", "truncated")
    rejected("random.jpg", "unreadable:", "not an image")
    rejected("bomb.png", "unreadable:", "decompression bomb")
    rejected("empty.jpg", "unreadable:", "empty")
    rejected("blurred.jpg", "blurred:")
    rejected("no_face.jpg", "no_face:")
    for name in (
        "good.jpg",
        "cmyk.jpg",
        "palette.png",
        "rgba.png",
        "exif_rotated.jpg",
        "sixteen.png",
        "grey.jpg",
    ):
        r = rows[name]
        assert r.status == "aligned", (name, r.reason)
        assert r.n_faces == 1 and abs(r.roll) < 15, (name, r.roll)
        crop = np.asarray(Image.open(table.crop_path(r)))
        assert crop.shape == (112, 112, 3)
    # greyscale photos are aligned but flagged; a site can choose to reject them
    assert rows["grey.jpg"].reason.startswith("grayscale:")
    assert rows["sixteen.png"].reason.startswith("grayscale:")
    assert rows["good.jpg"].reason == ""
    strict = align_photos(
        [src / "grey.jpg"], tmp_path / "strict", detector, QCConfig(reject_grayscale=True), workers=1
    )
    assert strict.rows[0].status == "rejected" and strict.rows[0].reason.startswith("grayscale:")


def test_decoding_converts_modes_faithfully(tmp_path, face):
    grey16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgb = read_photo(save(Image.fromarray(grey16), tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (300, 300, 3)
    assert abs(rgb.mean() - np.asarray(face.convert("L")).mean()) < 1.0  # not clipped to white
    rgba = face.convert("RGBA")
    rgba.putalpha(0)
    assert (read_photo(save(rgba, tmp_path / "clear.png")) == 255).all()  # composited on white
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = read_photo(save(face.rotate(90, expand=True), tmp_path / "rot.jpg", quality=98, exif=exif))
    assert np.abs(rotated.astype(int) - np.asarray(face).astype(int)).mean() < 6  # upright again


def test_decompression_bomb_warning_becomes_an_error():
    # between PIL's warning threshold and its error threshold, with our own limit lifted
    with pytest.raises(PhotoError, match="decompression bomb"):
        decode_photo(png_with_size(10_000, 10_000), "big.png", max_pixels=10**12)
    with pytest.raises(PhotoError, match="big.png"):
        decode_photo(png_with_size(10_000, 10_000), "big.png")


def test_qc_rules_measure_pose(face, detector):
    lm = detector.detect(np.asarray(face))[0].landmarks
    assert abs(roll_degrees(lm)) < 10 and abs(yaw_ratio(lm)) < 0.3
    tilted = np.asarray(face.rotate(-30, resample=Image.BICUBIC, expand=True))  # clockwise 30 degrees
    lm_t = detector.detect(tilted)[0].landmarks
    assert roll_degrees(lm_t) == pytest.approx(roll_degrees(lm) + 30, abs=4)
    assert yaw_ratio(lm_t) == pytest.approx(yaw_ratio(lm), abs=0.05)  # roll does not leak into yaw
    # a nose moved sideways by half the eye distance reads as yaw 0.5
    eye = lm[1] - lm[0]
    moved = lm.copy()
    moved[2] = (lm[0] + lm[1]) / 2 + 0.5 * eye + 0.4 * np.array([-eye[1], eye[0]])  # and down the face
    assert yaw_ratio(moved) == pytest.approx(0.5, abs=1e-6)


def test_qc_thresholds_are_applied_with_reasons(tmp_path, face, detector):
    path = save(face, tmp_path / "face.jpg", quality=95)
    strict = QCConfig(min_inter_ocular_px=1000, min_score=0.999, max_yaw=0.0, max_roll_deg=0.0, min_blur=1e9)
    row = align_photos([path], tmp_path / "out", detector, strict, workers=1).rows[0]
    assert row.status == "rejected"
    for code in ("face_too_small:", "low_score:", "strong_yaw:", "strong_roll:", "blurred:"):
        assert code in row.reason
    assert row.inter_ocular_px > 50 and row.score > 0.5 and row.blur > 0


def test_several_faces_policies(tmp_path, face, detector):
    big = Image.new("RGB", (900, 500), (200, 200, 200))
    big.paste(face, (50, 100))
    big.paste(face.resize((120, 120)), (700, 20))  # a smaller face near a corner
    two = save(big, tmp_path / "two.jpg", quality=95)
    pair = Image.new("RGB", (700, 400), (200, 200, 200))
    pair.paste(face, (30, 50))
    pair.paste(face, (370, 50))
    equal = save(pair, tmp_path / "equal.jpg", quality=95)
    table = align_photos([two, equal], tmp_path / "out", detector, QCConfig(), workers=1)
    assert [r.n_faces for r in table.rows] == [2, 2]
    assert table.rows[0].status == "aligned" and "largest central of 2" in table.rows[0].reason
    assert table.rows[1].status == "rejected" and "none dominates" in table.rows[1].reason
    rej = align_photos([two], tmp_path / "rej", detector, QCConfig(multi_face="reject"), workers=1)
    assert rej.rows[0].status == "rejected" and "policy 'reject'" in rej.rows[0].reason
    with pytest.raises(ValueError):
        QCConfig(multi_face="first")  # type: ignore[arg-type]
