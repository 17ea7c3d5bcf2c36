"""Photo quality control: every rejected photo gets a reason, nothing is dropped silently.

A site's photo archive holds scans, greyscale prints, group pictures, profile shots, thumbnails and
damaged files. Each check below is one small function returning a reason string (starting with a
stable code such as `face_too_small:`) or None, so the alignment table says exactly why a photo
was left out and a site can tune a threshold in `QCConfig` instead of editing code.

`read_photo` is the decoding gate: only JPEG and PNG are opened (`photofile`), sizes are capped
before reading and pixel counts before decoding; it applies EXIF orientation, converts every
colour mode to 8-bit RGB and turns truncated or corrupt files and decompression bombs into
`PhotoError`s that name the file.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from struct import error as StructError
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from fahr_core.faces.detect import Face
from fahr_core.faces.errors import PhotoError
from fahr_core.faces.photofile import open_photo, read_photo_bytes

MultiFacePolicy = Literal["largest_central", "reject"]


@dataclass(frozen=True)
class QCConfig:
    """Thresholds of the quality checks (the defaults are justified in docs/alignment.md)."""

    # Several faces: "largest_central" keeps the face with the largest size x centrality, but only
    # if it clearly dominates (its key is `dominance` times the runner-up's), else the photo is
    # ambiguous (a couple, a group) and rejected; "reject" rejects every photo with several faces.
    multi_face: MultiFacePolicy = "largest_central"
    dominance: float = 1.5
    min_score: float = 0.6  # detector confidence of the chosen face
    min_inter_ocular_px: float = 20.0  # eye-centre distance in the photo, pixels
    max_yaw: float = 0.45  # |nose offset from the eye midpoint| / inter-ocular distance (~40 degrees)
    max_roll_deg: float = 40.0  # angle of the eye line
    min_blur: float = 20.0  # variance of the Laplacian of the aligned grey face (112x112 scale)
    max_outside: float = 0.1  # fraction of the aligned face region that lies outside the photo
    # Greyscale photos are aligned and flagged in the reason column by default (old scans are common
    # and the encoder sees replicated channels); True rejects them.
    reject_grayscale: bool = False
    grayscale_tolerance: float = 4.0  # mean max channel difference (0-255) below which it is grey
    pad_fraction: float = 0.4  # border added (each side) before a second detection attempt
    max_pixels: int = 80_000_000  # decompression-bomb limit (width x height), checked before decoding
    # JPEGs above this are decoded at the first of 1/2, 1/4, 1/8 scale (libjpeg's DCT scaling, nearly
    # free) that fits, or at 1/8:
    # a 64-Mpx photo would otherwise cost ~2 GB per worker, and 16 Mpx keeps any face QC accepts.
    max_decode_pixels: int = 16_000_000

    def __post_init__(self) -> None:
        if self.multi_face not in ("largest_central", "reject"):
            raise ValueError(f"multi_face must be 'largest_central' or 'reject', not {self.multi_face!r}")
        if self.dominance < 1.0:
            raise ValueError("dominance must be >= 1")


# --- decoding ---

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white (scans, logos, PNG exports)."""
    if im.mode in (*_SIXTEEN_BIT, "I", "F"):
        # convert("RGB") would clip 16-bit values at 255 (a white picture): rescale instead
        a = np.asarray(im, dtype=np.float64)
        if im.mode in _SIXTEEN_BIT:
            top = 65535.0
        elif im.mode == "I":  # 32-bit integer: 16-bit data from some decoders, else 8-bit values
            top = 65535.0 if a.size and a.max() > 255 else 255.0
        else:  # float images are 0..1 or 0..255
            top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        a = np.clip(np.nan_to_num(a) * (255.0 / top), 0, 255).round().astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "L" and "transparency" in im.info:
        return _to_rgb(im.convert("LA"))
    return im.convert("RGB")


def _opened(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The photo opened as JPEG or PNG with its pixel count checked, nothing decoded yet."""
    im = open_photo(data, name)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise PhotoError(f"{name}: {w}x{h} pixels exceeds the {max_pixels} limit (decompression bomb?)")
    if w < 1 or h < 1:
        im.close()
        raise PhotoError(f"{name}: empty image ({w}x{h})")
    return im


@contextlib.contextmanager
def _decoding_errors(name: str) -> Iterator[None]:
    """Turn every way a decoder fails on bad bytes into a PhotoError naming the file."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half grey
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except PhotoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PhotoError(f"{name}: decompression bomb refused ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, StructError) as e:
        raise PhotoError(f"{name}: corrupt or truncated image ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def decode_photo(
    data: bytes,
    name: str,
    max_pixels: int = QCConfig.max_pixels,
    max_decode_pixels: int = QCConfig.max_decode_pixels,
) -> np.ndarray:
    """Photo bytes -> RGB uint8 HxWx3, upright. Raises PhotoError('<name>: <why>')."""
    with _decoding_errors(name), _opened(data, name, max_pixels) as im:
        w, h = im.size
        if im.format == "JPEG" and w * h > max_decode_pixels:
            k = next((k for k in (2, 4) if (w // k) * (h // k) <= max_decode_pixels), 8)
            im.draft(im.mode, (math.ceil(w / k), math.ceil(h / k)))
        im.seek(0)  # first frame of a multi-frame file
        im.load()
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: keep the stored orientation, QC sees the result
            upright = im
        rgb = _to_rgb(upright)
        return np.asarray(rgb, dtype=np.uint8).copy()


def verify_photo(data: bytes, name: str, max_pixels: int = QCConfig.max_pixels) -> None:
    """Check a photo's format, size and integrity cheaply, without a full decode (`fahr-client check`).

    PNG: every chunk's CRC up to IEND (`verify`). JPEG: decoded at 1/8 scale, which still reads
    every byte of the compressed data, so a truncated file fails here as it would in alignment.
    """
    with _decoding_errors(name), _opened(data, name, max_pixels) as im:
        if im.format == "PNG":
            im.verify()
        else:
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()


def read_photo(path: Path, max_pixels: int = QCConfig.max_pixels) -> np.ndarray:
    """Read (size-capped) and decode one photo file to RGB uint8 HxWx3 (see `decode_photo`)."""
    return decode_photo(read_photo_bytes(path), str(path), max_pixels)


def pad_image(rgb: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """A constant (grey) border of `fraction` x the longer side on each side, and its width.

    Face detectors are trained on faces with context around them; a tight crop (like UTKFace's
    200x200 chips) gives them none. Faces found in the padded image are shifted back by -border.
    """
    border = round(fraction * max(rgb.shape[:2]))
    return np.pad(rgb, ((border, border), (border, border), (0, 0)), constant_values=127), border


# --- measurements ---


def roll_degrees(landmarks: np.ndarray) -> float:
    """Angle of the eye line against the horizontal (positive: clockwise in the picture)."""
    dx, dy = landmarks[1] - landmarks[0]
    return math.degrees(math.atan2(dy, dx))


def yaw_ratio(landmarks: np.ndarray) -> float:
    """Sideways nose offset from the eye midpoint, in inter-ocular distances (0 = frontal).

    Measured along the eye line, so roll does not leak in. A head turned by an angle t moves the
    nose tip sideways by about depth x sin(t) while the eyes close up to IOD x cos(t); with the
    nose tip about 0.53 IOD in front of the eyes (median of the face mesh on UTKFace), the ratio
    is about 0.53 x tan(t): 0.3 ~ 30 degrees, 0.45 ~ 40 degrees, 0.53 ~ 45 degrees.
    """
    eye_vec = landmarks[1] - landmarks[0]
    iod = float(np.linalg.norm(eye_vec))
    if iod == 0:
        return math.inf
    mid = (landmarks[0] + landmarks[1]) / 2
    return float(np.dot(landmarks[2] - mid, eye_vec / iod) / iod)


def laplacian_variance(rgb: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image: low means blurred or upsampled.

    With `mask`, only pixels whose whole neighbourhood is inside the mask count, so the edge of a
    black out-of-photo border does not pass for sharp detail.
    """
    g = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    if mask is not None:
        m = mask[1:-1, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:] & mask[:-2, 1:-1] & mask[2:, 1:-1]
        lap = lap[m]
    return float(lap.var()) if lap.size else 0.0


def colourfulness(rgb: np.ndarray) -> float:
    """Mean of the largest channel difference per pixel (0 for a greyscale picture)."""
    step = max(1, max(rgb.shape[:2]) // 256)
    a = rgb[::step, ::step].astype(np.int16)
    return float((a.max(axis=2) - a.min(axis=2)).mean())


# --- face choice ---


def centrality_key(face: Face, width: int, height: int) -> float:
    """Face size (inter-ocular px) weighted down linearly with distance from the photo centre."""
    mid = face.landmarks[:2].mean(0)
    d = np.linalg.norm((mid - (width / 2, height / 2)) / (width / 2, height / 2)) / math.sqrt(2)
    return face.inter_ocular * max(0.0, 1.0 - 0.5 * float(d))


def choose_face(faces: list[Face], width: int, height: int, qc: QCConfig) -> tuple[Face | None, str | None]:
    """The face to align and, if none can be chosen, why (no face, several faces by policy)."""
    if not faces:
        return None, "no_face: no face detected"
    if len(faces) == 1:
        return faces[0], None
    if qc.multi_face == "reject":
        return None, f"several_faces: {len(faces)} faces (policy 'reject')"
    keyed = sorted(faces, key=lambda f: -centrality_key(f, width, height))
    best, second = (centrality_key(f, width, height) for f in keyed[:2])
    if best < qc.dominance * second:
        return None, (
            f"several_faces: {len(faces)} faces and none dominates (policy 'largest_central', "
            f"size x centrality {best:.0f} vs {second:.0f} < x{qc.dominance:g})"
        )
    return keyed[0], None


# --- rules: each returns a reason or None ---


def check_score(score: float, qc: QCConfig) -> str | None:
    return f"low_score: detection score {score:.2f} < {qc.min_score:g}" if score < qc.min_score else None


def check_size(inter_ocular: float, qc: QCConfig) -> str | None:
    if inter_ocular < qc.min_inter_ocular_px:
        return f"face_too_small: inter-ocular {inter_ocular:.1f} px < {qc.min_inter_ocular_px:g}"
    return None


def check_yaw(yaw: float, qc: QCConfig) -> str | None:
    return f"strong_yaw: nose offset {yaw:+.2f} IOD, limit {qc.max_yaw:g}" if abs(yaw) > qc.max_yaw else None


def check_roll(roll: float, qc: QCConfig) -> str | None:
    if abs(roll) > qc.max_roll_deg:
        return f"strong_roll: eye line at {roll:+.0f} degrees, limit {qc.max_roll_deg:g}"
    return None


def check_blur(blur: float, qc: QCConfig) -> str | None:
    if blur < qc.min_blur:
        return f"blurred: Laplacian variance {blur:.1f} < {qc.min_blur:g}"
    return None


def check_outside(outside: float, qc: QCConfig) -> str | None:
    if outside > qc.max_outside:
        limit = f"{qc.max_outside:.0%}"
        return f"face_cut_off: {outside:.0%} of the face lies outside the photo (limit {limit})"
    return None


def check_grayscale(colour: float, qc: QCConfig) -> str | None:
    """A greyscale photo's reason (a rejection if `reject_grayscale`, else a note on an aligned row)."""
    if colour < qc.grayscale_tolerance:
        return f"grayscale: no colour in the photo (channel spread {colour:.1f} < {qc.grayscale_tolerance:g})"
    return None
