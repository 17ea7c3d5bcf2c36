"""The FAHR-Face ViT at 112x112 with a survival head, built on timm.

Two choices keep the model cheap to train privately with Opacus:
- the position embedding is the fixed 2-D sin-cos table MAE uses, and it and the class token are
  frozen. Both sit on timm's root module, and a trainable parameter there sends the whole model
  through Opacus' functorch fallback (measured: 6x slower, 10x the memory on a ViT-B).
- features are the mean of the patch tokens (MAE's fine-tuning default), so the frozen class
  token carries nothing the model needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

log = logging.getLogger(__name__)

PATCH = 16


@dataclass(frozen=True)
class ViTShape:
    dim: int
    depth: int
    heads: int


# vit_base is FAHR-Face's encoder; the smaller ones exist so CPUs and tests can run the same code.
SHAPES: dict[str, ViTShape] = {
    "vit_base": ViTShape(768, 12, 12),
    "vit_small": ViTShape(384, 12, 6),
    "vit_tiny": ViTShape(192, 12, 3),
    "vit_micro": ViTShape(128, 4, 4),
}


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table, with a zero row for the class token: (1, 1+grid^2, dim)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for a 2-D sin-cos table")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    for coord in (ys, xs):
        angles = np.outer(coord.reshape(-1), omega)
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(parts, axis=1)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def build_encoder(arch: str, img_size: int = 112) -> VisionTransformer:
    """A timm ViT with patch 16 and no classifier, returning pooled features of size `dim`."""
    if arch not in SHAPES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(SHAPES)}")
    s = SHAPES[arch]
    enc = VisionTransformer(
        img_size=img_size,
        patch_size=PATCH,
        embed_dim=s.dim,
        depth=s.depth,
        num_heads=s.heads,
        num_classes=0,
        global_pool="avg",
        class_token=True,
    )
    with torch.no_grad():
        enc.pos_embed.copy_(sincos_pos_embed(s.dim, img_size // PATCH))
    enc.pos_embed.requires_grad_(False)
    enc.cls_token.requires_grad_(False)
    return enc


class DiscreteHazardHead(nn.Module):
    """Maps features to a risk score eta (a log hazard ratio) and per-interval baseline terms.

    The baseline is a Linear layer fed with ones rather than a bare Parameter so that Opacus can
    compute its per-sample gradients with its ordinary Linear hook.
    """

    def __init__(self, dim: int, n_intervals: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.risk = nn.Linear(dim, 1)
        self.baseline = nn.Linear(1, n_intervals, bias=False)
        nn.init.zeros_(self.risk.weight)
        nn.init.zeros_(self.risk.bias)
        nn.init.constant_(self.baseline.weight, -2.0)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eta = self.risk(self.norm(features)).squeeze(-1)
        alpha = self.baseline(features.new_ones(features.shape[0], 1))
        return eta, alpha


class SurvivalViT(nn.Module):
    """Face -> (risk score eta, per-interval baseline). `risk()` is what reports and ranking use."""

    def __init__(self, arch: str = "vit_base", img_size: int = 112, n_intervals: int = 10):
        super().__init__()
        self.encoder = build_encoder(arch, img_size)
        self.head = DiscreteHazardHead(self.encoder.embed_dim, n_intervals)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x))

    def set_trainable(self, spec: str) -> None:
        """Choose what DP-SGD updates: "all", "head", or "last:N" (head plus the last N blocks).

        Under DP the noise grows with the number of trained parameters, so small cohorts do better
        training fewer of them on top of a pre-trained encoder. Position embedding and class
        token stay frozen whatever the spec (see the module docstring).
        """
        if spec == "all":
            train_blocks = len(self.encoder.blocks)
        elif spec == "head":
            train_blocks = 0
        elif spec.startswith("last:") and spec[5:].isdigit():
            train_blocks = min(int(spec[5:]), len(self.encoder.blocks))
        else:
            raise ValueError(f"trainable must be 'all', 'head' or 'last:N', got {spec!r}")
        for p in self.encoder.parameters():
            p.requires_grad_(spec == "all")
        for block in list(self.encoder.blocks)[len(self.encoder.blocks) - train_blocks :]:
            block.requires_grad_(True)
        self.encoder.norm.requires_grad_(train_blocks > 0)
        self.encoder.pos_embed.requires_grad_(False)
        self.encoder.cls_token.requires_grad_(False)

    @torch.no_grad()
    def risk(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        self.eval()
        return torch.cat([self(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])
