"""The gate every site photo passes before any decoder sees it: format allow-list and size caps.

Pillow identifies a file by its content and will hand a PostScript or EPS file named `.jpg` to
Ghostscript (installed on most hospital machines that print), so fahr never lets Pillow choose:
only the formats below are opened. Files are size-checked before they are read (a 1 GB file is
not read whole into memory), and the pixel count is checked from the header before decoding.

JPEG and PNG are what cameras, phones (after export) and clinical photo systems produce; TIFF,
HEIC, WebP and the rest are refused with a message saying to export as JPEG or PNG.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from fahr_core.faces.errors import PhotoError

PHOTO_FORMATS = ("JPEG", "PNG")
MAX_PHOTO_BYTES = 64 * 2**20  # far above a 50-Mpx camera JPEG; a file beyond is not a face photo
EXPORT_HINT = "export it as JPEG or PNG"

# Leading bytes of formats that sites do meet, so the refusal says what the file actually is.
_SIGNATURES = (
    (b"%!PS", "a PostScript file"),
    (b"\xc5\xd0\xd3\xc6", "an EPS file"),
    (b"%PDF", "a PDF document"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def describe_unsupported(head: bytes) -> str:
    """What a file that is neither JPEG nor PNG is, from its first bytes (for the error message)."""
    if not head:
        return "is empty (0 bytes)"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return f"is a HEIC/HEIF image (iPhone format), which fahr does not read; {EXPORT_HINT}"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return f"is a WebP image, which fahr does not read; {EXPORT_HINT}"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"is {what}, not a photo fahr reads; {EXPORT_HINT}"
    return f"is not an image file (neither JPEG nor PNG by its content); {EXPORT_HINT}"


def read_photo_bytes(path: Path, max_bytes: int = MAX_PHOTO_BYTES) -> bytes:
    """The file's bytes, refusing (PhotoError naming the file) anything over `max_bytes` unread."""
    try:
        with Path(path).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise PhotoError(
                    f"{path}: {size / 2**20:.0f} MB is over the {max_bytes / 2**20:.0f} MB limit for a "
                    "photo; reduce it (a face photo needs a few MB at most)"
                )
            return f.read(max_bytes + 1)
    except IsADirectoryError:
        raise PhotoError(f"{path}: is a folder, not a photo file") from None
    except OSError as e:
        raise PhotoError(f"{path}: cannot read file ({e.strerror or e})") from None


def open_photo(data: bytes, name: str) -> Image.Image:
    """Open (header only, nothing decoded) photo bytes as JPEG or PNG, else PhotoError saying what it is."""
    try:
        return Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
    except Image.UnidentifiedImageError:
        raise PhotoError(f"{name}: {describe_unsupported(data[:16])}") from None
