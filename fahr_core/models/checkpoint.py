"""Weights on disk as safetensors (no pickle: a weights file cannot run code when loaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fahr_core.io import atomic_write_bytes

log = logging.getLogger(__name__)


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a state dict atomically, with string metadata (model arch, round, ...)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata or {}))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    return load_file(str(path))


def load_encoder_weights(encoder: torch.nn.Module, path: Path) -> None:
    """Load MAE-pretrained encoder weights, resampling the position table if the grid differs.

    The file holds timm VisionTransformer keys (patch_embed.*, blocks.*, norm.*, pos_embed, ...);
    keys of the MAE decoder, if present, are ignored. Anything else that does not match is an error.
    """
    from timm.layers import resample_abs_pos_embed

    state = {k: v for k, v in load_weights(path).items() if not k.startswith(("decoder", "mask_token"))}
    own = encoder.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        grid = int(round((own["pos_embed"].shape[1] - 1) ** 0.5))
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=(grid, grid), num_prefix_tokens=1)
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shapes do not match this model for {', '.join(bad[:5])}")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: not an encoder of this architecture (unexpected keys {unexpected[:5]})")
    if missing:
        log.warning("%s: encoder keys not in the checkpoint, left at init: %s", path, missing[:5])
