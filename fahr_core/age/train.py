"""FAHR-FaceAge fine-tuning: the ViT regresses age with an L1 loss, in two stages, in one call.

Stage 1 ("general") trains on the faces as they come; stage 2 ("balanced") continues at a lower
learning rate on age-balanced oversampled epochs (`fahr_core.age.sampling`) of the same length as
a general one (so an epoch costs the same in either stage), so the model stops
pulling the elderly towards the middle without forgetting the crowded decades. Both stages use
AdamW with layer-wise learning-rate decay (BEiT/MAE fine-tuning: block i of L gets
lr * decay^(L + 1 - (i + 1)), the embedding lr * decay^(L + 1), the final norm and the head the full
lr), so a pre-trained encoder's early layers move least; linear warm-up then cosine per stage;
random horizontal flips and random shifts of up to `shift` pixels (edge-padded crops), because a
small ViT fine-tuned for many epochs on ~15k faces otherwise memorises exact pixel positions.
The final model is the weighted mean of the two stages' last weights (`balanced_weight` on the
balanced end; WiSE-FT, Wortsman et al. 2022): both stages start from the same general model, so
their ends lie in one basin, and the mean keeps most of what the balanced stage gives the old
faces at a fraction of its cost on the crowded decades (measured in docs/age.md).
The validation faces are scored after every epoch and for the mean (stage "average"); the best of
these (by validation MAE, or by mean per-decade MAE) and the final model are saved with a card.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fahr_core.age.evaluate import age_metrics
from fahr_core.age.model import AgeViT, save_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.sampling import DEFAULT_CAP, balanced_epoch
from fahr_core.age.views import CENTRED, random_shift
from fahr_core.faces.images import to_input
from fahr_core.io import atomic_write_text
from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_core.models.checkpoint import load_encoder_weights
from fahr_core.models.device import compute_device
from fahr_core.train.pretrain import lr_factor

log = logging.getLogger(__name__)

CURVE_FILE = "curve.csv"
BEST_MODEL = "model_best.safetensors"
FINAL_MODEL = "model_final.safetensors"
CURVE_COLUMNS = ("stage", "epoch", "train_l1", "val_mae", "val_mean_decade_mae", "lr", "seconds")


@dataclass(frozen=True)
class AgeTrainConfig:
    arch: str = FAHR_FACE_ARCH
    img_size: int = 112
    epochs: int = 10  # stage 1, general
    balanced_epochs: int = 5  # stage 2, age-balanced; 0 skips it
    batch_size: int = 64
    lr: float = 1e-3  # stage 1 peak lr of the head (the top of the layer-wise decay)
    balanced_lr: float = 2.5e-4  # stage 2 peak lr
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # of each stage's steps
    shift: int = 0  # largest random shift (pixels) of a training face; 0 turns it off
    cap: float = DEFAULT_CAP  # largest oversampling factor of a decade in stage 2
    balanced_weight: float = 0.5  # share of stage 2's end in the final weights; 1 keeps it alone
    select: Literal["mae", "decade"] = "mae"  # what "best" minimises on validation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.balanced_epochs < 0 or self.epochs + self.balanced_epochs == 0:
            raise ValueError("need at least one epoch (epochs and balanced_epochs are >= 0)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.shift < self.img_size // 2:
            raise ValueError(f"shift must be in [0, {self.img_size // 2}), got {self.shift}")
        if not 0.0 <= self.balanced_weight <= 1.0:
            raise ValueError(f"balanced_weight must be in [0, 1], got {self.balanced_weight}")
        if self.select not in ("mae", "decade"):
            raise ValueError(f"select must be 'mae' or 'decade', got {self.select!r}")


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 embeddings, 1..depth blocks, depth + 1 the top."""
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed", "encoder.norm_pre")):
        return 0
    return depth + 1


def llrd_param_groups(model: AgeViT, layer_decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups with an `lr_scale` per layer; no weight decay on biases and norms (ndim < 2)."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = layer_id(name, depth), p.ndim >= 2
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_age_model(cfg: AgeTrainConfig, train_ages: np.ndarray, init: Path | None) -> AgeViT:
    """A fresh AgeViT scaled to the training ages, its encoder from an MAE encoder file if given."""
    torch.manual_seed(cfg.seed)
    model = AgeViT(cfg.arch, cfg.img_size, float(np.mean(train_ages)), float(np.std(train_ages)) or 1.0)
    model.train_shift = cfg.shift
    if init is not None:
        load_encoder_weights(model.encoder, Path(init))
    return model


def interpolate_(model: torch.nn.Module, start: dict[str, torch.Tensor], weight: float) -> None:
    """Move `model`'s floating-point weights to `(1 - weight) * start + weight * model`, in place."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.mul_(weight).add_(start[name].to(value.device), alpha=1.0 - weight)


def _write_curve(out_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out_dir / CURVE_FILE, buf.getvalue())


def _save(path: Path, model: AgeViT, card: dict[str, str]) -> None:
    save_age_model(path, model, card)
    lines = [f"# FAHR-FaceAge model ({model.arch}, {model.img_size}x{model.img_size})", ""]
    lines += [f"- {k}: {v}" for k, v in card.items()]
    lines += ["", "Load with `fahr_core.age.model.load_age_model(path)`; not a clinical model.", ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


def train_age_model(
    cfg: AgeTrainConfig,
    train_images: np.ndarray,
    train_ages: np.ndarray,
    val_images: np.ndarray,
    val_ages: np.ndarray,
    out_dir: Path,
    init: Path | None = None,
    card: dict[str, str] | None = None,
    echo: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run both stages; write model_best/model_final (.safetensors + .md) and curve.csv to `out_dir`.

    Images are uint8 (N, 3, S, S) aligned crops. Returns the history and the best epoch's row.
    """
    if len(train_images) < cfg.batch_size:
        raise ValueError(f"{len(train_images)} training faces: fewer than one batch of {cfg.batch_size}")
    if not len(val_images):
        raise ValueError("no validation faces")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    device = compute_device()
    model = build_age_model(cfg, train_ages, init).to(device)
    groups = llrd_param_groups(model, cfg.layer_decay, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    y = torch.as_tensor(train_ages, dtype=torch.float32, device=device)
    base_card = {
        **(card or {}),
        "init": str(init) if init else "random",
        "config": json.dumps(asdict(cfg), sort_keys=True),
    }
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start = time.perf_counter()

    def record(stage: str, epoch: int, what: str, train_l1: float | None, peak_lr: float | None) -> None:
        """Score the model on validation (the face and its mirror: cheap), log it, keep the best."""
        nonlocal best
        m = age_metrics(val_ages, predict_ages(model, val_images, shifts=CENTRED))
        row = {
            "stage": stage,
            "epoch": epoch,
            "train_l1": "" if train_l1 is None else round(train_l1, 4),
            "val_mae": round(m["mae"], 4),
            "val_mean_decade_mae": round(m["mean_decade_mae"], 4),
            "lr": "" if peak_lr is None else f"{peak_lr:g}",
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(row)
        _write_curve(out_dir, history)
        trained = "" if train_l1 is None else f"train L1 {train_l1:.2f} y, "
        echo(
            f"{what}: {trained}validation MAE {row['val_mae']:.2f} y, "
            f"mean per-decade MAE {row['val_mean_decade_mae']:.2f} y ({row['seconds']:.0f} s)"
        )
        key = "val_mae" if cfg.select == "mae" else "val_mean_decade_mae"
        if best is None or row[key] < best[key]:
            best = row
            meta = {f"best_{k}": str(v) for k, v in row.items()}
            _save(out_dir / BEST_MODEL, model, {**base_card, **meta})

    stages = [
        ("general", cfg.epochs, cfg.lr, lambda: rng.permutation(len(train_images))),
        (
            "balanced",
            cfg.balanced_epochs,
            cfg.balanced_lr,
            lambda: balanced_epoch(train_ages, rng, cfg.cap, size=len(train_images)),
        ),
    ]
    general_end: dict[str, torch.Tensor] | None = None
    for stage, epochs, peak_lr, draw in stages:
        if not epochs:
            continue
        if stage == "balanced" and cfg.epochs and cfg.balanced_weight < 1.0:
            general_end = {k: v.detach().clone() for k, v in model.state_dict().items()}
        orders = [draw() for _ in range(epochs)]  # drawn up front: the schedule needs the step count
        total = sum(len(o) // cfg.batch_size for o in orders)
        warmup = max(1, int(cfg.warmup_fraction * total))
        step = 0
        for epoch, order in enumerate(orders, start=1):
            model.train()
            losses = []
            for b in range(len(order) // cfg.batch_size):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                lr = peak_lr * lr_factor(step, warmup, total)
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                x = to_input(train_images[idx]).to(device)
                flip = torch.as_tensor(rng.random(len(idx)) < 0.5, device=device)
                x = random_shift(torch.where(flip[:, None, None, None], x.flip(-1), x), cfg.shift, rng)
                # bf16 on a GPU (about twice the speed; the L1 in float32), float32 on the CPU
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    pred = model(x)
                loss = (pred.float() - y[idx]).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
            record(stage, epoch, f"{stage} epoch {epoch}/{epochs}", float(np.mean(losses)), peak_lr)
    if general_end is not None:
        interpolate_(model, general_end, cfg.balanced_weight)
        what = f"mean of the general and balanced ends ({cfg.balanced_weight:g} on the balanced)"
        record("average", 1, what, None, None)
    assert best is not None  # at least one epoch ran (checked by the config)
    last = {f"final_{k}": str(v) for k, v in history[-1].items()}
    _save(out_dir / FINAL_MODEL, model, {**base_card, **last})
    return {"history": history, "best": best, "seconds": round(time.perf_counter() - start, 1)}
