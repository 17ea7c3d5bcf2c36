"""Faces through fahr's own aligner, and ages predicted for them.

Training, evaluation and prediction all read faces the way a site does: `align_photos` (BlazeFace +
face mesh, quality control, ArcFace template), cached by content, so the model is always applied to
the same kind of crop it was trained on, and a photo is aligned once however often it is used.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fahr_core.age.model import AgeViT
from fahr_core.age.views import fixed_views, view_shifts
from fahr_core.faces.detect import BlazeFaceDetector, Detector
from fahr_core.faces.images import load_faces, to_input
from fahr_core.faces.pipeline import AlignmentTable, align_photos
from fahr_core.faces.qc import QCConfig
from fahr_core.io import atomic_write_text
from fahr_core.train.pretrain import IMAGE_SUFFIXES, list_images

ARRAYS_DIR = "arrays"  # decoded-crop cache inside the alignment folder


def aligned_faces(
    paths: Sequence[Path],
    aligned_dir: Path,
    img_size: int,
    workers: int | None = None,
    detector: Detector | None = None,
) -> tuple[AlignmentTable, np.ndarray]:
    """Align `paths` (cached in `aligned_dir`); the table, and uint8 crops of its aligned rows in order."""
    aligned_dir = Path(aligned_dir)
    table = align_photos(paths, aligned_dir, detector or BlazeFaceDetector(), QCConfig(), workers=workers)
    crops = [table.crop_path(r) for r in table.aligned]
    return table, load_faces(crops, img_size, aligned_dir / ARRAYS_DIR)


def predict_ages(
    model: AgeViT,
    images: np.ndarray,
    batch_size: int = 256,
    shifts: Sequence[tuple[int, int]] | None = None,
    mirror: bool = True,
) -> np.ndarray:
    """Predicted ages (years) of uint8 crops (N, 3, S, S), converted to floats one batch at a time.

    Each face's age is the mean of the model's answers for its test-time views (`views.fixed_views`):
    the face and its mirror image, each centred and, for a model trained on moved faces
    (`views.view_shifts`), moved 3 pixels each way (about 0.3 y less validation MAE than the
    forward pass alone, at ten times its cost; docs/age.md#test-time-views).
    `shifts=CENTRED, mirror=False` is the model's own forward pass, the one a linear fold of its
    head reproduces (`init_from_age_model`).
    """
    model.eval()
    device = next(model.parameters()).device  # the model's device: a GPU when the caller put it there
    moves = view_shifts(model.train_shift) if shifts is None else shifts
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_input(images[i : i + batch_size]).to(device)
            out.append(torch.stack([model(v) for v in fixed_views(x, moves, mirror)]).mean(0).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def predict_folder(
    model: AgeViT, photos: Path, out_csv: Path, aligned_dir: Path, workers: int | None = None
) -> AlignmentTable:
    """Write `out_csv`: file (relative to `photos`), predicted_age, status, reason; one row per photo.

    Photos that QC rejects (no face, several faces, blur, corrupt file, ...) get an empty
    predicted_age, status "rejected" and the aligner's reason, instead of stopping the run.
    """
    photos = Path(photos)
    files = list_images(photos)
    if not files:
        raise FileNotFoundError(f"{photos}: no photos found (looked for {', '.join(IMAGE_SUFFIXES)})")
    table, images = aligned_faces([photos / f for f in files], aligned_dir, model.img_size, workers)
    ages = iter(predict_ages(model, images))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "predicted_age", "status", "reason"])
    for rel, row in zip(files, table.rows, strict=True):
        age = f"{next(ages):.2f}" if row.status == "aligned" else ""
        w.writerow([rel, age, row.status, row.reason])
    atomic_write_text(Path(out_csv), buf.getvalue())
    return table
