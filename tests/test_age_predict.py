"""`fahr age predict`: a folder of photos is aligned first; photos QC rejects are reported, not fatal."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from fahr_core.age.model import AgeViT, load_age_model, save_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.views import CENTRED, TEST_SHIFTS
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.faces.images import load_faces
from fahr_core.faces.pipeline import AlignmentTable
from fahr_core.models import shipped
from fahr_research.cli import app as fahr_app


def test_predict_folder_with_a_corrupt_file_and_a_non_face(tmp_path) -> None:
    torch.manual_seed(0)
    model = AgeViT("vit_micro", 112)
    torch.nn.init.normal_(model.head.weight, std=0.25)  # so different faces get different ages
    save_age_model(tmp_path / "age.safetensors", model)
    photos = tmp_path / "photos"
    (photos / "ward2").mkdir(parents=True)
    faces = load_labelled_faces(demo_faces_dir())[:3]
    for i, f in enumerate(faces):
        shutil.copy(f.path, photos / ("ward2" if i == 2 else "") / f"patient{i}.jpg")
    (photos / "broken.jpg").write_bytes(faces[0].path.read_bytes()[:300])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(photos / "noise.png")

    out = tmp_path / "preds.csv"
    args = ["age", "predict", "--model", str(tmp_path / "age.safetensors"), "--photos", str(photos)]
    result = CliRunner().invoke(fahr_app, [*args, "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 predicted, 2 rejected" in result.output
    with out.open() as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["broken.jpg", "noise.png", "patient0.jpg", "patient1.jpg", "ward2/patient2.jpg"]
    assert rows["broken.jpg"]["status"] == rows["noise.png"]["status"] == "rejected"
    assert rows["broken.jpg"]["reason"].startswith("unreadable")
    assert rows["noise.png"]["reason"].startswith("no_face")
    assert rows["broken.jpg"]["predicted_age"] == rows["noise.png"]["predicted_age"] == ""

    table = AlignmentTable.read(tmp_path / "preds-aligned" / "alignment.csv")  # the default cache
    crops = {r.path: table.crop_path(r) for r in table.aligned}
    names = ["patient0.jpg", "patient1.jpg", "ward2/patient2.jpg"]
    expected = predict_ages(model, load_faces([crops[str(photos / n)] for n in names], 112))
    got = [float(rows[n]["predicted_age"]) for n in names]
    assert got == [round(float(e), 2) for e in expected] and len(set(got)) == 3


def test_an_age_is_the_mean_over_the_test_views_the_same_for_a_face_and_its_mirror_image() -> None:
    torch.manual_seed(0)
    model = AgeViT("vit_micro", 112)
    torch.nn.init.normal_(model.head.weight, std=0.25)
    model.train_shift = 6  # trained on moved faces: all ten views
    faces = load_faces(sorted((demo_faces_dir() / "images").iterdir())[:5], 112)
    mirrored = faces[..., ::-1].copy()
    once = predict_ages(model, faces, shifts=CENTRED, mirror=False)  # the forward pass alone
    flipped = predict_ages(model, mirrored, shifts=CENTRED, mirror=False)
    assert np.abs(once - flipped).max() > 0.01  # the model itself is not symmetric: a test that can fail
    both = predict_ages(model, faces, batch_size=2, shifts=CENTRED)  # batches of 2 and 1: face by face
    assert np.allclose(both, (once + flipped) / 2, atol=1e-4)
    views = predict_ages(model, faces)  # the default: ten views, a set closed under mirroring
    assert np.abs(views - both).max() > 0.01
    assert np.allclose(predict_ages(model, mirrored), views, atol=1e-4)


def test_the_training_shift_travels_with_the_file_and_picks_the_views(tmp_path) -> None:
    torch.manual_seed(0)
    model = AgeViT("vit_micro", 112)
    torch.nn.init.normal_(model.head.weight, std=0.25)
    faces = load_faces(sorted((demo_faces_dir() / "images").iterdir())[:3], 112)
    save_age_model(tmp_path / "still.safetensors", model)  # never trained on moved faces
    still = load_age_model(tmp_path / "still.safetensors")
    assert still.train_shift == 0
    assert np.allclose(predict_ages(still, faces), predict_ages(still, faces, shifts=CENTRED), atol=1e-6)
    model.train_shift = 6
    save_age_model(tmp_path / "moved.safetensors", model)
    moved = load_age_model(tmp_path / "moved.safetensors")
    assert moved.train_shift == 6
    assert np.allclose(predict_ages(moved, faces), predict_ages(moved, faces, shifts=TEST_SHIFTS), atol=1e-6)
    assert not np.allclose(predict_ages(moved, faces), predict_ages(still, faces), atol=1e-3)
    # files written before the key existed carry the shift in their trainer config: the shipped one
    assert load_age_model(shipped.AGE_MODEL).train_shift == 6
