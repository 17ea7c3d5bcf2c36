"""Where a model looks on a face: gradient x input saliency, averaged over a cohort of aligned faces.

Gradient x input (the one-step case of integrated gradients, with a mid-grey baseline) needs a single
backward pass per batch, so a site can afford it on a CPU for both the survival and the age model, and it
works for any differentiable scorer. Each face's map is |gradient x input| summed over colour channels and
normalised to sum 1, so every face weighs the same in the mean. Every face is warped onto the same ArcFace
template, so pixel (i, j) is the same facial location in every photo and the cohort's mean map means
"where, on a face, this model's output is sensitive" rather than a blur of unrelated positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fahr_core.faces.images import to_input

# A cohort's mean map is drawn only over this many patients or more: fewer faces would show individuals.
MIN_PATIENTS_FOR_SALIENCY = 10
Scorer = Callable[[torch.Tensor], torch.Tensor]  # model input (N, 3, H, W) -> one score per face (N,)


def saliency_maps(score: Scorer, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Per-face saliency of uint8 faces (N, 3, H, W): float (N, H, W), each map summing to 1.

    A face whose map is all zero (the score does not depend on it) keeps an all-zero map.
    """
    maps = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size]).requires_grad_(True)
        (grad,) = torch.autograd.grad(score(x).sum(), x)
        m = (grad * x).abs().sum(dim=1).detach()
        total = m.flatten(1).sum(dim=1).clamp_min(1e-12)
        maps.append((m / total[:, None, None]).numpy())
    h, w = images.shape[-2:]
    return np.concatenate(maps) if maps else np.zeros((0, h, w), np.float32)


def mean_saliency(score: Scorer, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The cohort's mean saliency map (H, W), summing to 1; raises ValueError on an empty cohort."""
    if len(images) == 0:
        raise ValueError("no faces to compute a saliency map from")
    return saliency_maps(score, images, batch_size).mean(axis=0)


def map_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps' pixels: 1 = same places in the same proportions, 0 = unrelated.

    None when either map is constant (correlation undefined).
    """
    if a.shape != b.shape:
        raise ValueError(f"saliency maps differ in shape: {a.shape} vs {b.shape}")
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class CohortSaliency:
    """Each model's mean saliency map over one cohort's faces, and the mean face to draw them on.

    Stays at the site (the maps go into its HTML report only); the similarity is the one number sent on.
    """

    maps: dict[str, np.ndarray]  # model label -> (H, W) mean map, in display order
    mean_face: np.ndarray  # uint8 (3, H, W): the average aligned face of the cohort
    n_faces: int

    @property
    def similarity(self) -> float | None:
        """Pearson correlation of the first two maps (None with fewer than two)."""
        maps = list(self.maps.values())
        return map_similarity(maps[0], maps[1]) if len(maps) >= 2 else None


def cohort_saliency(
    scorers: Mapping[str, Scorer], images: np.ndarray, batch_size: int = 32
) -> CohortSaliency:
    """Mean saliency of every scorer over the same faces (uint8 (N, 3, H, W))."""
    maps = {label: mean_saliency(score, images, batch_size) for label, score in scorers.items()}
    mean_face = images.astype(np.float64).mean(axis=0).round().astype(np.uint8)
    return CohortSaliency(maps, mean_face, len(images))
