"""Age-model evaluation: MAE overall, per decade and their mean, by sex and race, error vs age.

The overall MAE rewards doing well on the crowded 20-40s; the mean of the per-decade MAEs weighs
every decade equally and so shows whether the model fails the elderly (it regresses them towards
the middle), which is what matters when predicted age is used as a health marker.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from fahr_core.age.split import TOP_DECADE, decade
from fahr_core.cohort.faces import FaceRecord
from fahr_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fahr_core.report.figures import figure_png

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
GROUPS_FILE = "groups.csv"
FIGURE_FILE = "error_vs_age.png"


def decade_label(d: int) -> str:
    return f"{10 * d}+" if d == TOP_DECADE else f"{10 * d}-{10 * d + 9}"


def _group(err: np.ndarray, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """MAE per non-empty key, keys in sorted order."""
    labels = np.asarray(keys)
    return {
        str(k): {"n": int((labels == k).sum()), "mae": float(err[labels == k].mean())}
        for k in sorted(set(labels.tolist()) - {""})
    }


def age_metrics(
    true_ages: ArrayLike, predictions: ArrayLike, sex: Sequence[str] = (), race: Sequence[str] = ()
) -> dict[str, Any]:
    """The evaluation numbers; `by_sex`/`by_race` only cover faces with that label (empty = unknown)."""
    ages, predicted = np.asarray(true_ages, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    if ages.shape != predicted.shape or not len(ages):
        raise ValueError(f"need as many predictions as ages (> 0), got {len(predicted)} and {len(ages)}")
    err = np.abs(predicted - ages)
    by_decade = _group(err, [decade_label(decade(a)) for a in ages])
    ordered = sorted(by_decade.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))
    return {
        "n": int(len(ages)),
        "mae": float(err.mean()),
        "mean_decade_mae": float(np.mean([v["mae"] for _, v in ordered])),
        "bias": float((predicted - ages).mean()),  # > 0: the model over-estimates on average
        "by_decade": dict(ordered),
        "by_sex": _group(err, sex) if len(sex) else {},
        "by_race": _group(err, race) if len(race) else {},
    }


def error_vs_age_png(ages: np.ndarray, predicted: np.ndarray, metrics: dict[str, Any]) -> bytes:
    """Signed error of every face against its true age, with the per-decade MAE drawn over it."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.scatter(ages, predicted - ages, s=4, alpha=0.3, color="#2166ac", label="face (predicted - true)")
    ax.axhline(0, color="black", lw=0.8)
    centres = [int(k.split("-")[0].rstrip("+")) + 5 for k in metrics["by_decade"]]
    maes = [v["mae"] for v in metrics["by_decade"].values()]
    ax.plot(centres, maes, "o-", color="#b2182b", label="MAE per decade")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("error (years)")
    ax.set_title(f"MAE {metrics['mae']:.2f} y, mean per-decade MAE {metrics['mean_decade_mae']:.2f} y")
    ax.legend(loc="upper right", fontsize=8)
    return figure_png(fig)


def write_evaluation(
    out_dir: Path,
    faces: Sequence[FaceRecord],
    predicted: ArrayLike,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.json (+ `extra`), predictions.csv, groups.csv and error_vs_age.png; returns the metrics."""
    out_dir = Path(out_dir)
    ages = np.array([f.age for f in faces], dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    metrics = age_metrics(ages, pred, [f.sex for f in faces], [f.race for f in faces])
    atomic_write_json(out_dir / METRICS_FILE, {**(extra or {}), **metrics})

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "age", "predicted_age", "error", "sex", "race"])
    for f, p in zip(faces, pred, strict=True):
        w.writerow([f.path, f"{f.age:g}", f"{p:.2f}", f"{p - f.age:.2f}", f.sex, f.race])
    atomic_write_text(out_dir / PREDICTIONS_FILE, buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "value", "n", "mae"])
    w.writerow(["all", "", metrics["n"], f"{metrics['mae']:.3f}"])
    w.writerow(["mean_of_decades", "", metrics["n"], f"{metrics['mean_decade_mae']:.3f}"])
    for group in ("by_decade", "by_sex", "by_race"):
        for value, m in metrics[group].items():
            w.writerow([group[3:], value, m["n"], f"{m['mae']:.3f}"])
    atomic_write_text(out_dir / GROUPS_FILE, buf.getvalue())
    atomic_write_bytes(out_dir / FIGURE_FILE, error_vs_age_png(ages, pred, metrics))
    return metrics
