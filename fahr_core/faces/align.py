"""Five-point similarity alignment to the ArcFace 112x112 template.

FAHR-Face (like most face encoders) was trained on faces warped so that the eyes, nose tip and
mouth corners land on fixed template points; feeding it faces aligned the same way is what makes
its features comparable across photos and sites. A similarity transform (rotation, uniform scale,
translation) is used, never a full affine map, so faces are not sheared or stretched.

Coordinates are continuous pixel coordinates (pixel (i, j) covers [i, i+1) x [j, j+1)), as in
`fahr_core.faces.detect`. The template constants are in the OpenCV convention (pixel centres at
integers), so they are shifted by half a pixel here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The standard ArcFace / InsightFace 5-point template for 112x112 crops (OpenCV pixel-centre
# convention): left eye, right eye, nose tip, left mouth corner, right mouth corner (picture left/right).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
TEMPLATE_SIZE = 112


def template(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Template points (5x2) for a `size` x `size` crop, in continuous pixel coordinates."""
    return (ARCFACE_TEMPLATE + 0.5) * (size / TEMPLATE_SIZE)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix M minimising sum |dst - M @ [src, 1]|^2 (Umeyama, 1991).

    Closed form: SVD of the cross-covariance of the centred point sets gives the rotation (with a
    sign fix so it is never a reflection), the scale follows from the singular values and the
    source variance, and the translation maps the centroids onto each other.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("source points coincide: no transform is defined")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def alignment_matrix(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2x3 photo -> crop similarity that puts the five landmarks on the template."""
    return similarity_transform(landmarks, template(size))


def align(rgb: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Warp the face with these five landmarks onto the ArcFace template: uint8 (size, size, 3).

    Parts of the crop that fall outside the photo are black, as in InsightFace's norm_crop.
    """
    m = alignment_matrix(landmarks, size)
    # PIL wants the inverse map: crop coordinates -> photo coordinates.
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        # strong downscaling: shrink the photo first so bilinear sampling does not alias
        # (a crop pixel then spans 0.5 to 1 reduced pixel)
        factor = int(1 / scale)
        image = image.reduce(factor)
        inv = inv / factor
    out = image.transform(
        (size, size), Image.Transform.AFFINE, tuple(inv.ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(out, dtype=np.uint8)


# The face proper inside the 112x112 crop (brows to chin, cheek to cheek), as x0, y0, x1, y1. The
# rest of the crop is background: tight crops such as UTKFace's 200x200 chips legitimately leave
# 15-45% of the full ArcFace crop black, but never the face itself.
FACE_REGION = (20, 28, 92, 108)


def inside_mask(shape: tuple[int, ...], landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Boolean (size, size): which pixels of the aligned crop come from inside the photo."""
    m = alignment_matrix(landmarks, size)
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    c = np.arange(size) + 0.5
    xs, ys = np.meshgrid(c, c)
    src = transform_points(inv, np.stack([xs.ravel(), ys.ravel()], axis=1))
    h, w = shape[:2]
    inside = (src[:, 0] >= 0) & (src[:, 0] <= w) & (src[:, 1] >= 0) & (src[:, 1] <= h)
    return inside.reshape(size, size)


def face_region(size: int = TEMPLATE_SIZE) -> tuple[slice, slice]:
    """Row and column slices of `FACE_REGION` in a size x size crop."""
    x0, y0, x1, y1 = (round(v * size / TEMPLATE_SIZE) for v in FACE_REGION)
    return slice(y0, y1), slice(x0, x1)


def outside_fraction(shape: tuple[int, ...], landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> float:
    """Fraction of the face region of the aligned crop whose source lies outside the photo.

    A face cut by the photo's edge aligns to a crop with a black wedge across the face, and the mesh
    has had to guess the hidden landmarks, so such faces are rejected above a limit
    (`QCConfig.max_outside`). `shape` is the photo's (H, W, ...).
    """
    return float(1.0 - inside_mask(shape, landmarks, size)[face_region(size)].mean())
