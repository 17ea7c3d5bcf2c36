"""Crash-safe file writes: write to a temporary file beside the target, then rename over it.

A reader therefore sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PRIVATE_FILE_MODE = 0o600  # keys and a site's patient-derived files: the owner's account only
PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) readable by the owner only, whatever the umask.

    An existing folder is left as it is: its owner may have chosen to share it.
    """
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)  # parents get the umask's mode
        os.chmod(path, PRIVATE_DIR_MODE)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, exclusive: bool = False) -> None:
    """Write `data` to `path` via a temporary file and a rename, with the usual permissions or `mode`.

    (mkstemp creates files readable by the owner only; a report or config must not end up so. A
    private file passes PRIVATE_FILE_MODE and is never, not even briefly, readable by others.)
    `exclusive`: FileExistsError if `path` exists, decided atomically by link(2) (a key is never
    replaced by a second writer racing the first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
