"""The age model's views of a face: random moves in training, a fixed set averaged at test time."""

from __future__ import annotations

import numpy as np
import torch

from fahr_core.age.views import CENTRED, TEST_SHIFTS, fixed_views, random_shift, shift_each


def _dot(n: int) -> torch.Tensor:
    """n images with a single bright pixel in the centre: its new position is the image's move."""
    x = torch.zeros(n, 1, 21, 21)
    x[:, 0, 10, 10] = 1.0
    return x


def _position(img: torch.Tensor) -> tuple[int, int]:
    dy, dx = np.unravel_index(int(img[0].argmax()), img.shape[-2:])
    return int(dy) - 10, int(dx) - 10


def test_random_shift_moves_each_image_within_the_bound() -> None:
    x = _dot(200)
    out = random_shift(x, 3, np.random.default_rng(0))
    assert out.shape == x.shape
    pos = np.array([_position(o) for o in out])
    assert np.abs(pos).max() == 3  # the bound is reached, never exceeded
    assert len({tuple(p) for p in pos}) > 30  # each image draws its own shift (49 possible)
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(200))  # moved, not smeared or lost
    assert random_shift(x, 0, np.random.default_rng(0)) is x


def test_shift_each_moves_image_i_by_its_own_offset_and_replicates_the_edges() -> None:
    x = _dot(3)
    out = shift_each(x, np.array([[2, 0], [0, -3], [-1, 1]]))
    assert [_position(o) for o in out] == [(2, 0), (0, -3), (-1, 1)]
    ramp = torch.arange(5.0).repeat(1, 1, 5, 1)  # columns 0..4
    assert torch.equal(shift_each(ramp, np.array([[0, 2]]))[0, 0, 0], torch.tensor([0.0, 0, 0, 1, 2]))
    assert shift_each(x, np.zeros((3, 2), dtype=int)) is x


def test_fixed_views_are_each_shift_and_its_mirror_image() -> None:
    x = _dot(1)
    x[0, 0, 10, 12] = 0.5  # an asymmetric face: the mirror image differs
    views = list(fixed_views(x, TEST_SHIFTS, mirror=True))
    assert len(views) == 2 * len(TEST_SHIFTS) == 10
    assert [_position(v) for v in views[::2]] == list(TEST_SHIFTS)
    for plain, mirrored in zip(views[::2], views[1::2], strict=True):
        assert torch.equal(mirrored, plain.flip(-1)) and not torch.equal(mirrored, plain)
    assert [torch.equal(v, x) for v in fixed_views(x, CENTRED, mirror=False)] == [True]
