"""The views of a face the age model sees: randomly moved ones in training, a fixed few at test time.

Training moves each face by a few pixels (edges replicated, so there is no border to key on) and
flips half of them, so that a small ViT fine-tuned for many epochs on about 15,000 faces cannot
memorise exact pixel positions. The price is a model whose answer still depends a little on where
the face sits and which way it is turned; averaging its answers over a fixed set of views (the face
and its mirror image, each centred and moved 3 pixels up, down, left and right) removes most of that
dependence, at ten times the inference cost (docs/age.md#test-time-views).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

# (dy, dx) in pixels: the centred face and four 3-pixel moves, within the training shifts' range
TEST_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (3, 0), (-3, 0), (0, 3), (0, -3))
CENTRED: tuple[tuple[int, int], ...] = ((0, 0),)


def shift_each(x: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """Image i of `x` (N, C, S, S) moved by offsets[i] = (dy, dx) pixels, edges replicated."""
    pad = int(np.abs(offsets).max()) if len(offsets) else 0
    if pad == 0:
        return x
    size = x.shape[-1]
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    corners = pad - offsets  # where each image's window starts in the padded image
    return torch.stack([padded[i, :, t : t + size, lf : lf + size] for i, (t, lf) in enumerate(corners)])


def random_shift(x: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Each image of `x` (N, C, S, S) moved by its own random (dy, dx) in [-shift, shift]."""
    if shift == 0:
        return x
    corner = rng.integers(0, 2 * shift + 1, size=(len(x), 2))  # a window's corner in the padded image
    return shift_each(x, shift - corner)


def fixed_views(x: torch.Tensor, shifts: Sequence[tuple[int, int]], mirror: bool) -> Iterator[torch.Tensor]:
    """The batch `x` moved by each of `shifts` (all images alike), and with `mirror` each also flipped."""
    for dy, dx in shifts:
        moved = shift_each(x, np.tile([dy, dx], (len(x), 1)))
        yield moved
        if mirror:
            yield moved.flip(-1)
