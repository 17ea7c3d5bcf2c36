"""The FAHR-Face ViT at 112x112 with a survival head, built on timm.

Two choices keep the model cheap to train privately with Opacus:
- the position embedding is the fixed 2-D sin-cos table MAE uses, and it and the class token are
  frozen. Both sit on timm's root module, and a trainable parameter there sends the whole model
  through Opacus' functorch fallback (measured: 6x slower, 10x the memory on a ViT-B).
- every LayerNorm is torch's own, which Opacus hooks directly (timm's subclass is not found by its
  exact-type lookup and fell back to functorch).
- features are the mean of the patch tokens (MAE's fine-tuning default), so the frozen class
  token carries nothing the model needs.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fahr_core.models.archs import FAHR_FACE_ARCH, SHAPES

log = logging.getLogger(__name__)

PATCH = 16


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
        # torch's LayerNorm, not timm's subclass: Opacus finds per-sample gradient hooks by exact type,
        # and timm's LayerNorm sent every block norm of full fine-tuning to the functorch fallback
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    # timm types both as Optional: None only without a class token or with pos_embed="none"
    assert enc.pos_embed is not None and enc.cls_token is not None
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

    def __init__(self, arch: str = FAHR_FACE_ARCH, img_size: int = 112, n_intervals: int = 10):
        super().__init__()
        self.encoder = build_encoder(arch, img_size)
        self.head = DiscreteHazardHead(self.encoder.embed_dim, n_intervals)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x))

    @torch.no_grad()
    def risk(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """eta of every image of `x`, batch by batch on the model's device; returned on the CPU."""
        self.eval()
        device = next(self.parameters()).device
        batches = (x[i : i + batch_size].to(device) for i in range(0, len(x), batch_size))
        return torch.cat([self(b)[0].cpu() for b in batches])
