"""The age model's views of a face: random moves in training, a fixed set averaged at test time."""

from __future__ import annotations

import numpy as np
import torch

from fahr_core.age.views import CENTRED, TEST_SHIFTS, fixed_views, random_shift, shift_each, view_shifts


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
    ramp = torch.arange(1.0, 6.0).repeat(1, 1, 5, 1)  # columns 1..5: a zero border would show
    assert torch.equal(shift_each(ramp, np.array([[0, 2]]))[0, 0, 0], torch.tensor([1.0, 1, 1, 2, 3]))
    assert torch.equal(shift_each(ramp, np.array([[0, -2]]))[0, 0, 0], torch.tensor([3.0, 4, 5, 5, 5]))
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


def test_random_shift_draws_the_moves_the_trainer_always_drew() -> None:
    """The build's models are reproducible: a window corner in [0, 2 shift] per image, (dy, dx)."""
    x = torch.arange(2 * 13 * 13, dtype=torch.float32).reshape(2, 1, 13, 13)
    out = random_shift(x, 2, np.random.default_rng(7))
    corner = np.random.default_rng(7).integers(0, 5, size=(2, 2))
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="replicate")
    for i, (t, lf) in enumerate(corner):
        assert torch.equal(out[i], padded[i, :, t : t + 13, lf : lf + 13])


def test_a_model_gets_only_the_moves_it_was_trained_on() -> None:
    assert view_shifts(6) == view_shifts(3) == TEST_SHIFTS
    assert view_shifts(2) == view_shifts(0) == CENTRED
