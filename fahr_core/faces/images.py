"""Photo -> model input, with a cache so a site decodes each photo once, not once per round.

STOP-GAP: photos are assumed to be face crops already (like UTKFace's) and are only resized to
the model's input size. Detection and 5-point alignment to the ArcFace template replace this
(see docs/architecture.md, "Alignment").
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fahr_core.faces.errors import PhotoError  # defined there (no torch) and public here
from fahr_core.io import atomic_write_bytes

# Pixel normalisation of FAHR-Face inputs: [0, 255] -> [-1, 1].
MEAN, STD = 127.5, 127.5


def load_face(path: Path, size: int) -> np.ndarray:
    """Decode one photo (EXIF orientation applied, any mode -> RGB) to uint8 (3, size, size)."""
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PhotoError(f"{path}: cannot read photo ({e})") from None


def _cache_key(paths: Sequence[Path], size: int) -> str:
    h = hashlib.sha256(f"resize-v1:{size}".encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_faces(paths: Sequence[Path], size: int, cache_dir: Path | None = None) -> np.ndarray:
    """All photos as one uint8 array (N, 3, size, size), cached by path, size and mtime."""
    cache = Path(cache_dir) / f"faces-{size}-{_cache_key(paths, size)}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return np.load(cache)
    arr = np.stack([load_face(p, size) for p in paths]) if paths else np.zeros((0, 3, size, size), np.uint8)
    if cache is not None:
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(cache, buf.getvalue())
    return arr


def to_input(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float model input in [-1, 1]."""
    x = torch.as_tensor(batch)
    return (x.float() - MEAN) / STD
