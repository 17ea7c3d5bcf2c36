"""Does fahr's MAE pre-training help? Age on the shared UTKFace, from an MAE encoder vs random init.

The evidence issue #6 asks for, at CPU scale. Stages (each prints what it ran):

    python benchmarks/pretrain_value.py prepare --out RUN [--aligned CACHE]
        aligned crops of ../shared/data/utkface (fahr's aligner, cached in CACHE), the fixed decade split
        (fahr_core.age.split, on file names and labels.csv ages), one folder of crop links per part
        and `fahr shards build` of each: RUN/shards-train (the only faces MAE pre-training sees)
        and RUN/shards-validation.
    fahr pretrain --data RUN/shards-train --out RUN/mae ...      (see docs/pretraining.md)
    fahr export-encoder --checkpoint RUN/mae/checkpoint.pt --out RUN/encoder.safetensors
    python benchmarks/pretrain_value.py finetune --out RUN [--init RUN/encoder.safetensors]
        fine-tunes an AgeViT with `fahr age train`'s trainer (general stage: L1, layer-wise lr decay)
        on the training shards (or a seeded subset, --subset) with a fixed budget and writes the
        validation MAE (overall and per decade) to
        RUN/finetune-<mae|random>-<faces>x<epochs>.json.
    python benchmarks/pretrain_value.py probe --out RUN [--init RUN/encoder.safetensors]
        ridge regression of age on the frozen encoder's features (4,000 training faces):
        RUN/probe-<mae|random>-4000.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fahr_core.age.model import AgeViT
from fahr_core.age.split import decade_split
from fahr_core.age.train import AgeTrainConfig, train_age_model
from fahr_core.faces.detect import BlazeFaceDetector
from fahr_core.faces.images import to_input
from fahr_core.faces.pipeline import align_photos
from fahr_core.faces.qc import QCConfig
from fahr_core.io import atomic_write_json
from fahr_core.models.checkpoint import load_encoder_weights
from fahr_core.train.shards import ShardIndex, ShardReader

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"
PARTS = ("train", "validation")


def _labels() -> list[dict[str, str]]:
    with (SHARED / "labels.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def prepare(out: Path, aligned_dir: Path, shard_size: int) -> None:
    rows = _labels()
    paths = [SHARED / r["file"] for r in rows]
    table = align_photos(paths, aligned_dir, BlazeFaceDetector(), QCConfig(), workers=2)
    names = [Path(r["file"]).name for r in rows]
    split = dict(zip(PARTS, decade_split(names, [float(r["age"]) for r in rows]), strict=True))
    for part, indices in split.items():
        folder = out / f"faces-{part}"
        folder.mkdir(parents=True, exist_ok=True)
        kept = 0
        for i in indices:
            row = table.rows[i]
            if row.status != "aligned":
                continue
            link = folder / f"{names[i]}.png"
            if not link.is_symlink():
                link.symlink_to(table.crop_path(row))
            kept += 1
        print(f"{part}: {len(indices)} faces, {kept} aligned", flush=True)
        cmd = ["fahr", "shards", "build", "--src", str(folder), "--out", str(out / f"shards-{part}")]
        cmd += ["--shard-size", str(shard_size)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run([str(Path(sys.executable).parent / "fahr"), *cmd[1:]], check=True)


def _part(out: Path, part: str, ages: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """All images of a part's shards (small enough here to hold) and their ages."""
    reader = ShardReader(out / f"shards-{part}")
    names = ShardIndex.read(out / f"shards-{part}").names()
    y = np.array([ages[Path(n).name.removesuffix(".png")] for n in names], np.float32)
    return reader.read(np.arange(len(reader))), y


def finetune(
    out: Path, init: Path | None, arch: str, epochs: int, batch_size: int, lr: float, subset: int
) -> dict:
    """`fahr age train`'s trainer (general stage only, the same for both initialisations).

    `subset` > 0 fine-tunes on that many training faces (a seeded draw, the same for both), for a
    CPU-sized budget; the validation part is evaluated after every epoch and the last epoch reported.
    """
    ages = {Path(r["file"]).name: float(r["age"]) for r in _labels()}
    x_train, y_train = _part(out, "train", ages)
    x_val, y_val = _part(out, "validation", ages)
    if subset:
        keep = np.sort(np.random.default_rng(0).permutation(len(x_train))[:subset])
        x_train, y_train = x_train[keep], y_train[keep]
    cfg = AgeTrainConfig(arch=arch, epochs=epochs, balanced_epochs=0, batch_size=batch_size, lr=lr)
    tag = f"{'mae' if init else 'random'}-{len(x_train)}x{epochs}"
    run = train_age_model(cfg, x_train, y_train, x_val, y_val, out / f"finetune-{tag}", init)
    last = run["history"][-1]
    result = {
        "init": str(init) if init else "random",
        "config": asdict(cfg),
        "n_train": len(x_train),
        "train_subset_seed": 0 if subset else None,
        "n_validation": len(x_val),
        "val_mae": last["val_mae"],
        "val_mean_decade_mae": last["val_mean_decade_mae"],
        "curve": run["history"],
        "seconds": run["seconds"],
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
    }
    atomic_write_json(out / f"finetune-{tag}.json", result)
    return result


@torch.no_grad()
def probe(out: Path, init: Path | None, arch: str, subset: int, ridge: float = 1.0) -> dict:
    """Ridge regression of age on frozen, mean-pooled encoder features: is age in the features at all?"""
    ages = {Path(r["file"]).name: float(r["age"]) for r in _labels()}
    x_train, y_train = _part(out, "train", ages)
    x_val, y_val = _part(out, "validation", ages)
    keep = np.sort(np.random.default_rng(0).permutation(len(x_train))[:subset])
    torch.manual_seed(0)
    model = AgeViT(arch, 112, float(y_train.mean()))
    if init is not None:
        load_encoder_weights(model.encoder, init)
    model.eval()

    def features(x: np.ndarray) -> np.ndarray:
        f = np.concatenate([model.encoder(to_input(x[i : i + 256])).numpy() for i in range(0, len(x), 256)])
        return np.hstack([f, np.ones((len(f), 1), np.float32)]).astype(np.float64)

    f_train, f_val = features(x_train[keep]), features(x_val)
    w = np.linalg.solve(f_train.T @ f_train + ridge * np.eye(f_train.shape[1]), f_train.T @ y_train[keep])
    result = {
        "init": str(init) if init else "random",
        "n_train": len(keep),
        "ridge": ridge,
        "val_mae": float(np.abs(f_val @ w - y_val).mean()),
        "val_mae_train_mean": float(np.abs(y_train.mean() - y_val).mean()),
    }
    atomic_write_json(out / f"probe-{'mae' if init else 'random'}-{len(keep)}.json", result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--aligned", type=Path, default=None, help="alignment cache (default RUN/alignment)")
    p.add_argument("--shard-size", type=int, default=2000)
    f = sub.add_parser("finetune")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--init", type=Path, default=None, help="encoder from fahr export-encoder")
    f.add_argument("--arch", default="vit_micro")
    f.add_argument("--epochs", type=int, default=5)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--subset", type=int, default=0, help="fine-tune on this many training faces (0: all)")
    f.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("probe")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--init", type=Path, default=None)
    q.add_argument("--arch", default="vit_micro")
    q.add_argument("--subset", type=int, default=4000)
    a = ap.parse_args()
    if a.stage == "prepare":
        prepare(a.out, a.aligned or a.out / "alignment", a.shard_size)
    elif a.stage == "probe":
        torch.set_num_threads(1)
        print(json.dumps(probe(a.out, a.init, a.arch, a.subset), indent=2))
    else:
        torch.set_num_threads(a.threads)
        r = finetune(a.out, a.init, a.arch, a.epochs, a.batch_size, a.lr, a.subset)
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
