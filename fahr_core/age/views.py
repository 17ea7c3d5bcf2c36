"""The views of a face the age model sees: randomly moved ones in training, a fixed few at test time.

Training moves each face by a few pixels (edges replicated, so there is no border to key on) and
flips half of them, so that a small ViT fine-tuned for many epochs on about 15,000 faces cannot
memorise exact pixel positions. The price is a model whose answer still depends a little on where
the face sits and which way it is turned; averaging its answers over a fixed set of views (the face
and its mirror image, each centred and moved 3 pixels up, down, left and right) removes most of that
dependence, at ten times the inference cost (docs/age.md#test-time-views). Only moves a model was
trained on are used: one trained without (`fahr age train`'s default) gets the mirror pair alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

TEST_MOVE = 3  # pixels; a model trained on smaller moves (or none) gets the mirror pair only
# (dy, dx) in pixels: the centred face and four moves of TEST_MOVE
TEST_SHIFTS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (TEST_MOVE, 0),
    (-TEST_MOVE, 0),
    (0, TEST_MOVE),
    (0, -TEST_MOVE),
)
CENTRED: tuple[tuple[int, int], ...] = ((0, 0),)


def view_shifts(train_shift: int) -> tuple[tuple[int, int], ...]:
    """The moves of the test-time views for a model trained on moves of up to `train_shift` pixels:
    only moves it has seen, so a model trained without moves is scored on the centred face."""
    return TEST_SHIFTS if train_shift >= TEST_MOVE else CENTRED


def _padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """`x` with `pad` pixels of replicated edge on every side: a moved face shows no border."""
    return torch.nn.functional.pad(x, (pad,) * 4, mode="replicate") if pad else x


def _moved(padded: torch.Tensor, pad: int, size: int, dy: int, dx: int) -> torch.Tensor:
    """The `size` x `size` window of a `_padded` image (or batch) that moves it by (dy, dx) pixels."""
    return padded[..., pad - dy : pad - dy + size, pad - dx : pad - dx + size]


def shift_each(x: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
    """Image i of `x` (N, C, S, S) moved by offsets[i] = (dy, dx) pixels, edges replicated."""
    pad = int(np.abs(offsets).max()) if len(offsets) else 0
    if pad == 0:
        return x
    padded = _padded(x, pad)
    return torch.stack([_moved(padded[i], pad, x.shape[-1], dy, dx) for i, (dy, dx) in enumerate(offsets)])


def random_shift(x: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Each image of `x` (N, C, S, S) moved by its own random (dy, dx) in [-shift, shift]."""
    if shift == 0:
        return x
    corner = rng.integers(0, 2 * shift + 1, size=(len(x), 2))  # a window's corner in the padded image
    return shift_each(x, shift - corner)


def fixed_views(x: torch.Tensor, shifts: Sequence[tuple[int, int]], mirror: bool) -> Iterator[torch.Tensor]:
    """The batch `x` moved by each of `shifts` (all images alike), and with `mirror` each also flipped."""
    pad = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    padded = _padded(x, pad)
    for dy, dx in shifts:
        moved = _moved(padded, pad, x.shape[-1], dy, dx)
        yield moved
        if mirror:
            yield moved.flip(-1)
