"""`fahr pretrain` / `fahr export-encoder` / `fahr shards build`: MAE pre-training of the FAHR-Face encoder.

Multi-GPU (or multi-process on CPU):
    torchrun --nproc_per_node=8 -m fahr_research.pretrain pretrain --data ... --out ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_ops.cli import new_app
from fahr_research.options import Arch, ImgSize, WeightDecay

app = new_app("MAE pre-training of the FAHR-Face encoder.")
shards_app = typer.Typer(
    help="Pre-decoded uint8 face shards for fast pre-training input.", no_args_is_help=True
)
app.add_typer(shards_app, name="shards")


@app.callback()
def _main() -> None:
    """MAE pre-training of the FAHR-Face encoder."""


@app.command("pretrain")
def pretrain_command(
    data: Annotated[
        Path, typer.Option(help="Folder of face crops (identity folders or flat), or of shards.")
    ],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint.pt, loss_curve.csv/.png, files.txt.")],
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt if it exists.")] = False,
    arch: Arch = FAHR_FACE_ARCH,
    img_size: ImgSize = 112,
    mask_ratio: Annotated[float, typer.Option(help="Fraction of patches masked.")] = 0.75,
    decoder_dim: Annotated[int, typer.Option(help="MAE decoder width.")] = 512,
    decoder_depth: Annotated[int, typer.Option(help="MAE decoder blocks.")] = 8,
    decoder_heads: Annotated[int, typer.Option(help="MAE decoder attention heads.")] = 16,
    norm_pix_loss: Annotated[bool, typer.Option(help="Per-patch normalised pixel targets.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per process per micro-step.")] = 256,
    accum_steps: Annotated[int, typer.Option(help="Micro-steps per optimiser step.")] = 1,
    base_lr: Annotated[float, typer.Option(help="lr = base_lr * global batch / 256.")] = 1.5e-4,
    weight_decay: WeightDecay = 0.05,
    warmup_steps: Annotated[int, typer.Option(help="Linear lr warm-up steps.")] = 2000,
    total_steps: Annotated[int, typer.Option(help="Steps of the cosine lr schedule.")] = 100_000,
    stop_at: Annotated[int | None, typer.Option(help="Checkpoint and stop after this step.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 1000,
    log_every: Annotated[int, typer.Option(help="Steps between log lines.")] = 50,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes per process.")] = 8,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (CUDA only).")] = True,
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, masking and data order.")] = 0,
) -> None:
    """Pre-train the encoder as a masked autoencoder. Under torchrun, every process runs this."""
    from fahr_core.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        arch=arch,
        img_size=img_size,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        decoder_dim=decoder_dim,
        decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
        batch_size=batch_size,
        accum_steps=accum_steps,
        base_lr=base_lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        bf16=bf16,
        compile=compile,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        num_workers=workers,
        seed=seed,
    )
    try:
        summary = pretrain(cfg, data, out, resume=resume, stop_at=stop_at, echo=typer.echo)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            f"done: {summary['steps']} steps, {summary['images_seen']} images seen, "
            f"loss {summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}"
        )


@app.command("export-encoder")
def export_encoder_command(
    checkpoint: Annotated[Path, typer.Option(help="A pre-training checkpoint.pt.")],
    out: Annotated[Path, typer.Option(help="Encoder weights to write (.safetensors); a .md card beside it.")],
) -> None:
    """Write the pre-trained encoder for `load_encoder_weights`; set it as the model's encoder_checkpoint."""
    from fahr_core.train.pretrain import export_encoder

    if not checkpoint.is_file():
        typer.echo(f"error: {checkpoint}: no such checkpoint", err=True)
        raise typer.Exit(2)
    path = export_encoder(checkpoint, out)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")


@shards_app.command("build")
def shards_build_command(
    src: Annotated[Path, typer.Option(help="Folder of faces: WebFace42M identity folders, or flat.")],
    out: Annotated[Path, typer.Option(help="Shard folder: shard-NNNNN.npy, index.json, files.txt.")],
    shard_size: Annotated[int, typer.Option(help="Images per shard (10,000 at 112 px: 376 MB).")] = 10_000,
    img_size: Annotated[int, typer.Option(help="Stored size; other sizes are resized (bilinear).")] = 112,
    align: Annotated[
        bool, typer.Option(help="Detect, quality-check and align first (fahr-client align's aligner).")
    ] = False,
    align_dir: Annotated[
        Path | None, typer.Option(help="Alignment cache for --align (default OUT/alignment; resumable).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes for alignment and decoding.")] = 1,
) -> None:
    """Decode a folder of faces once into memory-mappable shards (re-run to resume a killed build)."""
    from fahr_core.train.pretrain import list_images
    from fahr_core.train.shards import ShardIndex, build_shards

    names = list_images(src)
    if not names:
        typer.echo(f"error: {src}: no images found", err=True)
        raise typer.Exit(2)
    skipped: list[dict] = []
    if align:
        from fahr_core.faces.detect import BlazeFaceDetector
        from fahr_core.faces.pipeline import align_photos

        with typer.progressbar(length=len(names), label="aligning") as bar:
            table = align_photos(
                [src / n for n in names],
                align_dir or out / "alignment",
                BlazeFaceDetector(),
                workers=workers,
                progress=lambda done, total: bar.update(1),
            )
        sources = [
            (n, table.crop_path(r)) for n, r in zip(names, table.rows, strict=True) if r.status == "aligned"
        ]
        skipped = [
            {"file": n, "reason": f"alignment: {r.reason}"}
            for n, r in zip(names, table.rows, strict=True)
            if r.status != "aligned"
        ]
    else:
        sources = [(n, src / n) for n in names]
    try:
        build_shards(
            sources,
            out,
            img_size,
            shard_size,
            skipped,
            workers,
            progress=lambda done, total: typer.echo(f"shard {done}/{total} written"),
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    index = ShardIndex.read(out)
    typer.echo(
        f"{sum(index.counts)} images in {len(index.files)} shards in {out}; "
        f"{len(index.skipped)} skipped (listed with reasons in {out / 'index.json'})"
    )


if __name__ == "__main__":
    app()
