"""Saliency maps: a model that sees one region lights up that region only; real models give finite maps
that differ between models; the report draws them side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fahr_core.age.model import AgeViT
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.faces.images import load_faces
from fahr_core.models.saliency import cohort_saliency, map_similarity, mean_saliency, saliency_maps
from fahr_core.models.vit import SurvivalViT
from fahr_core.report.figures import saliency_png


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """12 real bundled faces at the models' input size."""
    return load_faces([f.path for f in load_labelled_faces(demo_faces_dir())[:12]], 112)


def _region(rows: slice, cols: slice):
    """A 'model' whose score is the sum of one image region's pixels."""
    return lambda x: x[:, :, rows, cols].sum(dim=(1, 2, 3))


def test_a_model_that_sees_one_region_lights_up_only_that_region(faces):
    maps = saliency_maps(_region(slice(0, 56), slice(0, 56)), faces)
    assert maps.shape == (len(faces), 112, 112)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0)
    assert maps[:, :56, :56].sum() == pytest.approx(len(faces))
    assert np.all(maps[:, 56:, :] == 0) and np.all(maps[:, :, 56:] == 0)


def test_models_looking_at_different_regions_have_dissimilar_maps(faces):
    top = mean_saliency(_region(slice(0, 56), slice(None)), faces)
    bottom = mean_saliency(_region(slice(56, None), slice(None)), faces)
    assert map_similarity(top, top) == pytest.approx(1.0)
    assert map_similarity(top, bottom) < 0
    assert map_similarity(top, np.zeros_like(top)) is None
    with pytest.raises(ValueError, match="differ in shape"):
        map_similarity(top, top[:10])
    with pytest.raises(ValueError, match="no faces"):
        mean_saliency(_region(slice(0, 56), slice(None)), faces[:0])


def test_real_models_give_finite_maps_that_differ(faces):
    torch.manual_seed(0)
    survival = SurvivalViT("vit_micro", 112, 10).eval()
    torch.nn.init.normal_(survival.head.risk.weight)  # zero-initialised: every gradient would be 0
    age = AgeViT("vit_micro", 112).eval()
    torch.nn.init.normal_(age.head.weight)
    result = cohort_saliency({"Survival risk score": lambda x: survival(x)[0], "Predicted age": age}, faces)
    assert result.n_faces == len(faces) and result.mean_face.shape == (3, 112, 112)
    for m in result.maps.values():
        assert m.shape == (112, 112) and np.all(np.isfinite(m)) and m.sum() == pytest.approx(1.0, rel=1e-5)
    assert result.similarity is not None and result.similarity < 0.99
    png = saliency_png(result.maps, result.mean_face)
    assert png.startswith(b"\x89PNG")
