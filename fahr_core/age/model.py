"""The FAHR-FaceAge model: the FAHR-Face encoder with a linear head that outputs age in years.

It is saved as one safetensors file whose metadata says how to rebuild it (arch, img_size) and
what it was trained on, so a site can load the federation's age model from a single path or from
the weights the server sends, without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_core.models.checkpoint import load_weights, save_weights
from fahr_core.models.vit import build_encoder

KIND = "fahr-face-age"
TRAIN_SHIFT = "train_shift"  # metadata key: the largest random move of the training faces, pixels


class AgeViT(nn.Module):
    """Face (N, 3, H, W) -> predicted age in years (N,).

    The head predicts a standardised age, `age_mean + age_scale * head(features)`, with both
    constants taken from the training labels and saved with the weights. A head that had to reach
    ages of 0-100 in raw years moves only about one lr per Adam step and spends thousands of steps
    getting there: short runs then never leave the constant prediction.
    """

    def __init__(
        self, arch: str = FAHR_FACE_ARCH, img_size: int = 112, mean_age: float = 40.0, sd_age: float = 20.0
    ):
        super().__init__()
        if not sd_age > 0:
            raise ValueError(f"sd_age must be positive, got {sd_age}")
        self.arch = arch
        self.img_size = img_size
        self.encoder = build_encoder(arch, img_size)
        self.head = nn.Linear(self.encoder.embed_dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # start at the mean: early L1 gradients are sane
        self.register_buffer("age_mean", torch.tensor(float(mean_age)))
        self.register_buffer("age_scale", torch.tensor(float(sd_age)))
        # the largest random move (pixels) of its training faces: which test-time views it knows
        self.train_shift = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.age_mean + self.age_scale * self.head(self.encoder(x)).squeeze(-1)


def save_age_model(path: Path, model: AgeViT, card: dict[str, str] | None = None) -> None:
    """Write the model with the metadata `load_age_model` needs, plus a free-form card."""
    meta = {**(card or {}), "kind": KIND, "arch": model.arch, "img_size": str(model.img_size)}
    meta[TRAIN_SHIFT] = str(model.train_shift)
    save_weights(path, model.state_dict(), meta)


def _train_shift(metadata: dict[str, str], where: str) -> int:
    """The training shift a file records. Files written before it was recorded carry it in their
    trainer config; neither means a model never trained on moved faces (0)."""
    try:
        if TRAIN_SHIFT in metadata:
            return int(metadata[TRAIN_SHIFT])
        return int(json.loads(metadata.get("config", "{}")).get("shift", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise ValueError(f"{where}: age model metadata has no valid {TRAIN_SHIFT} or config shift") from None


def age_model_from_state(state: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> AgeViT:
    """Rebuild an AgeViT from weights and their metadata; `where` names the source in errors."""
    if metadata.get("kind") != KIND:
        raise ValueError(f"{where}: not a fahr age model (metadata kind={metadata.get('kind')!r})")
    try:
        model = AgeViT(metadata["arch"], int(metadata["img_size"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: age model metadata lacks a valid arch/img_size ({e})") from None
    model.train_shift = _train_shift(metadata, where)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not fit {metadata['arch']}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model


def load_age_model(path: Path) -> AgeViT:
    from safetensors import safe_open

    path = Path(path)
    state = load_weights(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return age_model_from_state(state, metadata, str(path))
