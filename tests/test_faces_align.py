"""Similarity transform and warping onto the ArcFace template (no detector needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fahr_core.faces.align import (
    ARCFACE_TEMPLATE,
    align,
    alignment_matrix,
    outside_fraction,
    similarity_transform,
    template,
    transform_points,
)


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([scale * rot, [[tx], [ty]]])


@pytest.mark.parametrize(
    "scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (2.5, 33.0, -40.0, 7.5), (0.3, -170.0, 5, 900)]
)
def test_similarity_transform_recovers_a_known_transform_exactly(scale, angle, tx, ty):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, size=(5, 2))
    m = _similarity(scale, angle, tx, ty)
    dst = transform_points(m, src)
    np.testing.assert_allclose(similarity_transform(src, dst), m, atol=1e-9)


def test_similarity_transform_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    mirrored = src * [-1, 1]  # the best similarity to a mirror image is not a reflection
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    # noisy points: residual no larger than that of the true transform
    true = _similarity(1.7, 12.0, 3.0, -4.0)
    dst = transform_points(true, src) + rng.normal(0, 0.5, size=src.shape)
    fit = similarity_transform(src, dst)
    assert np.sum((transform_points(fit, src) - dst) ** 2) <= np.sum((transform_points(true, src) - dst) ** 2)
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), dst)


def test_template_is_the_arcface_constants():
    assert ARCFACE_TEMPLATE.shape == (5, 2)
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_allclose(ARCFACE_TEMPLATE[4], [70.7299, 92.2041])
    np.testing.assert_allclose(template(224), (ARCFACE_TEMPLATE + 0.5) * 2)


def test_align_puts_marked_points_on_the_template():
    """Bright dots drawn where a rotated, scaled face's landmarks are end up on the template."""
    m = _similarity(3.0, 25.0, 150.0, 60.0)  # template -> photo
    landmarks = transform_points(m, template())
    photo = np.zeros((600, 600, 3), np.uint8)
    yy, xx = np.mgrid[0:600, 0:600] + 0.5
    for x, y in landmarks:
        photo[(xx - x) ** 2 + (yy - y) ** 2 <= 4.0**2] = 255
    crop = align(photo, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    grey = crop[:, :, 0].astype(float)
    cy, cx = np.mgrid[0:112, 0:112] + 0.5
    for tx, ty in template():
        near = ((cx - tx) ** 2 + (cy - ty) ** 2) <= 3.0**2
        w = grey * near
        centroid = np.array([(w * cx).sum(), (w * cy).sum()]) / w.sum()
        assert np.linalg.norm(centroid - (tx, ty)) < 0.3
    np.testing.assert_allclose(
        transform_points(alignment_matrix(landmarks), landmarks), template(), atol=1e-6
    )


def test_outside_fraction_sees_faces_cut_by_the_border():
    landmarks = transform_points(_similarity(2.0, 0.0, 100.0, 100.0), template())
    assert outside_fraction((400, 400, 3), landmarks) == 0.0
    cut = landmarks - [200.0, 0.0]  # same face moved half out of the left edge
    assert outside_fraction((400, 400, 3), cut) > 0.3
