"""`fahr age train | eval | predict`: FAHR-FaceAge on public labelled faces (docs/age.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_ops.cli import new_app
from fahr_research.options import (
    AlignmentCache,
    AlignmentWorkers,
    Arch,
    ImgSize,
    Threads,
    WeightDecay,
    set_threads,
)

app = new_app("FAHR-FaceAge: train, evaluate and apply the age model.")

Layout = Annotated[str, typer.Option(help="labels (labels.csv), utkface, agedb, appa, or auto.")]


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option(help="Labelled faces (see --layout); split by decade, seed 0.")],
    out: Annotated[Path, typer.Option(help="Run folder: models, curve.csv, split.csv, validation/.")],
    init: Annotated[
        Path | None, typer.Option(help="MAE encoder (fahr export-encoder); default: random init.")
    ] = None,
    arch: Arch = FAHR_FACE_ARCH,
    img_size: ImgSize = 112,
    epochs: Annotated[int, typer.Option(help="Stage 1 (general) epochs.")] = 10,
    balanced_epochs: Annotated[int, typer.Option(help="Stage 2 (age-balanced) epochs.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Stage 1 peak learning rate (head; lower layers decay).")] = 1e-3,
    balanced_lr: Annotated[float, typer.Option(help="Stage 2 peak learning rate.")] = 2.5e-4,
    layer_decay: Annotated[float, typer.Option(help="Layer-wise lr decay per block (1 = none).")] = 0.75,
    weight_decay: WeightDecay = 0.05,
    cap: Annotated[float, typer.Option(help="Largest oversampling factor of a decade in stage 2.")] = 20.0,
    shift: Annotated[int, typer.Option(help="Largest random shift of a training face, pixels.")] = 0,
    balanced_weight: Annotated[
        float,
        typer.Option(help="Final model: this share of stage 2's end, the rest stage 1's (1 = stage 2)."),
    ] = 0.5,
    select: Annotated[str, typer.Option(help="Best epoch by validation 'mae' or 'decade' MAE.")] = "mae",
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    layout: Layout = "auto",
    aligned: AlignmentCache = None,
    workers: AlignmentWorkers = 0,
    threads: Threads = 0,
) -> None:
    """Fine-tune the ViT for age (L1): a general stage, then an age-balanced one, in one run."""
    from fahr_core.age.train import AgeTrainConfig
    from fahr_core.age.workflow import train_on_folder
    from fahr_core.cohort.faces import FaceLabelError

    set_threads(threads)
    try:
        cfg = AgeTrainConfig(
            arch=arch,
            img_size=img_size,
            epochs=epochs,
            balanced_epochs=balanced_epochs,
            batch_size=batch_size,
            lr=lr,
            balanced_lr=balanced_lr,
            layer_decay=layer_decay,
            weight_decay=weight_decay,
            cap=cap,
            balanced_weight=balanced_weight,
            shift=shift,
            select=select,  # type: ignore[arg-type]  # checked by the config
            seed=seed,
        )
        train_on_folder(data, out, cfg, layout, aligned, init, workers or None, echo=typer.echo)
    except (FaceLabelError, FileNotFoundError, ValueError) as e:
        raise _fail(e) from None
    typer.echo(f"wrote {out}/model_best.safetensors, model_final.safetensors, curve.csv, validation/")


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option(help="An age model (.safetensors from fahr age train).")],
    data: Annotated[Path, typer.Option(help="Labelled faces (see --layout).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, groups.csv, predictions.csv, plot.")],
    part: Annotated[str, typer.Option(help="all, or the fixed split's train or validation part.")] = "all",
    layout: Layout = "auto",
    aligned: AlignmentCache = None,
    workers: AlignmentWorkers = 0,
    threads: Threads = 0,
) -> None:
    """MAE overall, per decade and their mean, by sex and race, and an error-vs-age plot."""
    from fahr_core.age.workflow import evaluate_on_folder, summary_line
    from fahr_core.cohort.faces import FaceLabelError

    set_threads(threads)
    try:
        metrics = evaluate_on_folder(model, data, out, part, layout, aligned, workers or None)  # type: ignore[arg-type]
    except (FaceLabelError, FileNotFoundError, ValueError) as e:
        raise _fail(e) from None
    typer.echo(f"{summary_line(metrics)}; wrote {out}")


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Option(help="An age model (.safetensors from fahr age train).")],
    photos: Annotated[Path, typer.Option(help="Folder of photos (any depth); each is aligned first.")],
    out: Annotated[Path, typer.Option(help="CSV to write: file,predicted_age,status,reason.")],
    aligned: AlignmentCache = None,
    workers: AlignmentWorkers = 0,
    threads: Threads = 0,
) -> None:
    """Predict the age of every photo in a folder; photos QC rejects are listed with the reason."""
    from fahr_core.age.model import load_age_model
    from fahr_core.age.predict import predict_folder
    from fahr_core.models.device import compute_device

    set_threads(threads)
    try:
        table = predict_folder(
            load_age_model(model).to(compute_device()),
            photos,
            out,
            aligned or out.with_name(f"{out.stem}-aligned"),
            workers or None,
        )
    except (FileNotFoundError, ValueError) as e:
        raise _fail(e) from None
    typer.echo(f"wrote {out}: {len(table.aligned)} predicted, {len(table.rejected)} rejected by QC")


if __name__ == "__main__":
    app()
