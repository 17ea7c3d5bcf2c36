"""A labelled folder to a trained, evaluated age model: what `fahr age train` and `fahr age eval` run.

The validation faces are the fixed decade-stratified split of `fahr_core.age.split`, drawn on all
labelled faces before alignment, so the split does not depend on the aligner's QC; faces QC
rejects are left out of both parts and counted. Every face goes through fahr's own aligner
(`fahr_core.age.predict.aligned_faces`), the same as `fahr age predict` and the sites.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fahr_core.age.datasets import load_age_faces
from fahr_core.age.evaluate import write_evaluation
from fahr_core.age.model import load_age_model
from fahr_core.age.predict import aligned_faces, predict_ages
from fahr_core.age.split import SEED, VALIDATION_FRACTION, decade_split
from fahr_core.age.train import BEST_MODEL, AgeTrainConfig, train_age_model
from fahr_core.cohort.faces import FaceRecord
from fahr_core.io import atomic_write_text
from fahr_core.models.device import compute_device

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
VALIDATION_DIR = "validation"
Part = Literal["all", "train", "validation"]


class LabelledFaces:
    """The labelled faces of a folder, their fixed split, and their aligned crops."""

    def __init__(
        self, data: Path, layout: str, aligned_dir: Path, img_size: int, workers: int | None = None
    ) -> None:
        self.data = Path(data)
        self.records = load_age_faces(self.data, layout)
        self.ages = np.array([f.age for f in self.records], dtype=np.float64)
        train, validation = decade_split([f.path.name for f in self.records], self.ages.tolist())
        self.parts = {"train": train, "validation": validation, "all": list(range(len(self.records)))}
        paths = [f.path for f in self.records]
        self.table, self.images = aligned_faces(paths, aligned_dir, img_size, workers)
        aligned = [i for i, row in enumerate(self.table.rows) if row.status == "aligned"]
        self._crop = {i: k for k, i in enumerate(aligned)}  # face index -> row of self.images

    def part(self, name: Part) -> tuple[list[FaceRecord], np.ndarray, int]:
        """The aligned faces of a part, their crops, and how many of the part QC rejected."""
        if name not in self.parts:
            raise ValueError(f"part must be one of {', '.join(self.parts)}, got {name!r}")
        kept = [i for i in self.parts[name] if i in self._crop]
        crops = self.images[[self._crop[i] for i in kept]]
        return [self.records[i] for i in kept], crops, len(self.parts[name]) - len(kept)

    def write_split(self, path: Path) -> None:
        """file,age,part,status: which face went where, so a result can be re-derived and audited."""
        part = {i: "validation" for i in self.parts["validation"]}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "age", "part", "status"])
        for i, (f, row) in enumerate(zip(self.records, self.table.rows, strict=True)):
            w.writerow([f.path, f"{f.age:g}", part.get(i, "train"), row.status])
        atomic_write_text(path, buf.getvalue())


def summary_line(metrics: dict[str, Any]) -> str:
    """One line for a log or a CLI: the two headline numbers and the face count."""
    return (
        f"MAE {metrics['mae']:.2f} y, mean per-decade MAE {metrics['mean_decade_mae']:.2f} y "
        f"on {metrics['n']} faces"
    )


def train_on_faces(
    cfg: AgeTrainConfig,
    data: Path,
    train: tuple[Sequence[FaceRecord], np.ndarray],
    val: tuple[Sequence[FaceRecord], np.ndarray],
    out: Path,
    init: Path | None,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """`train_age_model` on (labelled records, aligned crops) of each part.

    The card says where the faces came from, so `fahr age train` and `fahr models build` write the same one.
    """
    (train_faces, x_train), (val_faces, x_val) = train, val
    card = {"data": str(data), "train_faces": str(len(train_faces)), "validation_faces": str(len(val_faces))}
    ages = [np.array([f.age for f in faces]) for faces in (train_faces, val_faces)]
    return train_age_model(cfg, x_train, ages[0], x_val, ages[1], out, init=init, card=card, echo=echo)


def train_on_folder(
    data: Path,
    out: Path,
    cfg: AgeTrainConfig,
    layout: str = "auto",
    aligned_dir: Path | None = None,
    init: Path | None = None,
    workers: int | None = None,
    echo: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Split, align, train both stages, then evaluate the best model on validation (out/validation)."""
    out = Path(out)
    faces = LabelledFaces(data, layout, aligned_dir or out / "aligned", cfg.img_size, workers)
    faces.write_split(out / SPLIT_FILE)
    train, train_images, train_rejected = faces.part("train")
    val, val_images, val_rejected = faces.part("validation")
    echo(
        f"{len(faces.records)} labelled faces: {len(train)} train + {len(val)} validation aligned, "
        f"{train_rejected + val_rejected} rejected by QC (split: seed {SEED}, {VALIDATION_FRACTION:.0%} "
        f"per decade)"
    )
    result = train_on_faces(cfg, data, (train, train_images), (val, val_images), out, init, echo)
    model = load_age_model(out / BEST_MODEL).to(compute_device())
    extra = {"model": str(out / BEST_MODEL), "data": str(data), "part": "validation"}
    metrics = write_evaluation(
        out / VALIDATION_DIR,
        val,
        predict_ages(model, val_images),
        {**extra, "rejected_by_qc": val_rejected, "train_seconds": result["seconds"]},
    )
    echo(f"best model ({out / BEST_MODEL}) on validation: {summary_line(metrics)}")
    return {**result, "validation": metrics}


def evaluate_on_folder(
    model_path: Path,
    data: Path,
    out: Path,
    part: Part = "all",
    layout: str = "auto",
    aligned_dir: Path | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate a saved age model on a part of a labelled folder; write the evaluation files to `out`."""
    model = load_age_model(Path(model_path)).to(compute_device())
    faces = LabelledFaces(data, layout, aligned_dir or Path(out) / "aligned", model.img_size, workers)
    records, images, rejected = faces.part(part)
    if not records:
        raise ValueError(f"{data}: no aligned faces in part {part!r}")
    extra = {"model": str(model_path), "data": str(data), "part": part, "rejected_by_qc": rejected}
    return write_evaluation(Path(out), records, predict_ages(model, images), extra)
