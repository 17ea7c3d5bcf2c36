"""BlazeFace + face-mesh detector on real photographs (../shared/data/wild, InsightFace's t1.jpg)."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fahr_core.faces.align import alignment_matrix, outside_fraction, template, transform_points
from fahr_core.faces.detect import BlazeFaceDetector, Detector, insightface_detector
from fahr_core.faces.qc import read_photo
from tests.support import SHARED

WILD = SHARED / "wild"
PORTRAITS = ["img5.jpg", "img6.jpg", "img8.jpg", "img10.jpg", "img11.jpg", "img12.jpg"]


@pytest.fixture(scope="module")
def detector() -> BlazeFaceDetector:
    return BlazeFaceDetector()


def wild(name: str) -> np.ndarray:
    if not (WILD / name).is_file():
        pytest.skip(f"{WILD} is not present")
    return read_photo(WILD / name)


def test_detector_protocol_and_pickling(detector):
    assert isinstance(detector, Detector)
    assert detector.fingerprint.startswith("blazeface-mesh")
    clone = pickle.loads(pickle.dumps(detector))  # what a worker process receives
    face = np.asarray(
        Image.open(next((Path(__file__).parents[1] / "fahr_core/demo_data/images").glob("*.jpg")))
    )
    a, b = detector.detect(face), clone.detect(face)
    assert len(a) == len(b) == 1
    np.testing.assert_allclose(a[0].landmarks, b[0].landmarks)


@pytest.mark.parametrize("name", PORTRAITS)
def test_single_portraits_have_exactly_one_face(detector, name):
    faces = detector.detect(wild(name))
    assert len(faces) == 1
    lm = faces[0].landmarks
    # picture order: left eye left of right eye, mouth corners likewise, mouth below the eyes
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert lm[3:, 1].min() > lm[:2, 1].max()


def test_couple_has_two_faces(detector):
    assert len(detector.detect(wild("couple.jpg"))) == 2


def test_selfie_has_about_eight_faces(detector):
    faces = detector.detect(wild("selfie-many-people.jpg"))
    assert 6 <= len(faces) <= 10  # 7 found (docs/alignment.md); the 8th is mostly hidden
    centres = np.array([f.landmarks[:2].mean(0) for f in faces])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=2) + np.eye(len(faces)) * 1e9
    assert distances.min() > 20  # no face reported twice


def eye_errors(detector, rgb: np.ndarray) -> list[float]:
    """Per face (not cut by the photo's edge): worst eye distance from the template after alignment."""
    out = []
    for face in detector.detect(rgb):
        if outside_fraction(rgb.shape, face.landmarks) > 0.1:
            continue  # the mesh guesses the hidden part of faces cut by the photo's edge
        mapped = transform_points(alignment_matrix(face.landmarks), face.landmarks)
        out.append(float(np.linalg.norm(mapped[:2] - template()[:2], axis=1).max()))
    return out


@pytest.mark.parametrize("name", [*PORTRAITS, "couple.jpg"])
def test_aligned_eyes_land_on_the_template(detector, name):
    errors = eye_errors(detector, wild(name))
    assert errors and max(errors) < 3.0


def test_aligned_eyes_in_the_group_selfie(detector):
    # broad smiles and turned heads move nose and mouth, which pulls the 5-point fit off the eyes
    errors = eye_errors(detector, wild("selfie-many-people.jpg"))
    assert len(errors) >= 4 and np.median(errors) < 3.0 and max(errors) < 5.0


def test_insightface_t1_group_photo(detector):
    spec = importlib.util.find_spec("insightface")
    if spec is None:
        pytest.skip("insightface is not installed (its sample photo t1.jpg ships with it)")
    t1 = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg"
    faces = detector.detect(read_photo(t1))
    assert 5 <= len(faces) <= 7  # six people; BlazeFace finds all six (docs/alignment.md)
    model_dir = os.environ.get("FAHR_INSIGHTFACE_DIR")
    if model_dir and (Path(model_dir) / "det_10g.onnx").is_file():
        scrfd = insightface_detector(Path(model_dir)).detect(read_photo(t1))
        assert len(scrfd) == 6
        for f in faces:  # both detectors put the eyes within 10% of the inter-ocular distance
            d = min(np.linalg.norm(g.landmarks[:2] - f.landmarks[:2], axis=1).max() for g in scrfd)
            assert d < 0.1 * f.inter_ocular


def test_insightface_detector_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="det_10g.onnx"):
        insightface_detector(tmp_path)


def test_insightface_detector_says_how_to_install(tmp_path):
    if importlib.util.find_spec("insightface") and importlib.util.find_spec("onnxruntime"):
        pytest.skip("insightface is installed")
    (tmp_path / "det_10g.onnx").write_bytes(b"not a model")
    with pytest.raises(ImportError, match="pip install insightface onnxruntime"):
        insightface_detector(tmp_path)


def test_rejects_non_rgb_input(detector):
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(np.zeros((10, 10), np.uint8))


def test_scrfd_wrapper_converts_colour_order_and_coordinates(tmp_path):
    """The SCRFD wrapper without insightface: a stand-in model records what it is given."""
    from fahr_core.faces.detect import ScrfdDetector

    class FakeScrfd:
        def detect(self, img, input_size):
            self.seen = img
            boxes = np.array([[10, 20, 50, 70, 0.6], [100, 20, 150, 70, 0.9]], np.float32)
            kps = np.tile(np.arange(10, dtype=np.float32).reshape(1, 5, 2), (2, 1, 1))
            return boxes, kps

    (tmp_path / "det_10g.onnx").write_bytes(b"x")
    fake = FakeScrfd()
    det = ScrfdDetector(tmp_path / "det_10g.onnx", model=fake)
    rgb = np.zeros((80, 200, 3), np.uint8)
    rgb[..., 0] = 255  # red
    faces = det.detect(rgb)
    assert fake.seen[0, 0].tolist() == [0, 0, 255]  # insightface wants BGR
    assert [f.score for f in faces] == pytest.approx([0.9, 0.6])
    assert faces[0].box == (100.5, 20.5, 150.5, 70.5)  # cv2 pixel centres -> pixel edges
    np.testing.assert_allclose(faces[0].landmarks, np.arange(10).reshape(5, 2) + 0.5)
    assert det.fingerprint.startswith("scrfd:")
