"""The encoder architectures fahr builds: the one list every config check, CLI option and help text uses.

Kept apart from `fahr_core.models.vit` (which builds them with timm) so that validating a config or
rendering `--help` names the architectures without importing timm.
"""

from __future__ import annotations

from dataclasses import dataclass


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
ARCHS = tuple(SHAPES)
FAHR_FACE_ARCH = "vit_base"  # the default wherever an architecture is chosen
