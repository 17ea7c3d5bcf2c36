"""Pre-decoded face shards: uint8 (N, H, W, 3) `.npy` files that pre-training memory-maps.

Why: decoding 200 px JPEGs with PIL ran at 16k images/s on a 16-core GPU host, below the MAE step
rate of one H200, and every epoch decoded every photo again. A shard is decoded once; `np.load(...,
mmap_mode="r")` maps it without reading it, so a batch reads only the pages of its own images and
40M faces never need to fit in memory.

A shard folder holds:
- `shard-00000.npy`: uint8 (n, S, S, 3), RGB, S = the index's img_size, n <= shard_size;
- `shard-00000.json`: that shard's part of the index (its files, skipped files, sha256), written
  after the `.npy`, so its presence means the shard is complete;
- `plan.json`: what is being built (source list hash, image size, shard size);
- `files.txt`: the source name of every image, in shard order (image i of the whole set is line i);
- `index.json`: written last; shards (file, count, sha256), totals, image size, the files.txt
  hash and every skipped source with the reason. Its presence marks a finished build.

Source j always goes to shard j // shard_size, whether or not earlier sources were skipped, so each
shard is built on its own: a killed build leaves complete shards (atomic writes) and no marker for
the one it was writing, and a re-run with the same plan builds only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fahr_core.faces.images import PhotoError, load_face
from fahr_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "fahr-face-shards-v1"
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
FILES_FILE = "files.txt"

Source = tuple[str, Path]  # (name recorded in the index, file decoded)
Progress = Callable[[int, int], None]


def _shard_stem(i: int) -> str:
    return f"shard-{i:05d}"


def is_shard_dir(path: Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_shard(out: Path, i: int, sources: Sequence[Source], img_size: int) -> dict:
    """Decode one shard's sources (resized to img_size when they are not already) and write it."""
    images = np.empty((len(sources), img_size, img_size, 3), np.uint8)
    files: list[str] = []
    skipped: list[dict[str, str]] = []
    for name, path in sources:
        try:
            images[len(files)] = load_face(path, img_size).transpose(1, 2, 0)
        except PhotoError as e:
            skipped.append({"file": name, "reason": str(e)})
            continue
        files.append(name)
    buf = io.BytesIO()
    np.save(buf, images[: len(files)])
    data = buf.getvalue()
    stem = _shard_stem(i)
    atomic_write_bytes(out / f"{stem}.npy", data)
    meta = {"file": f"{stem}.npy", "count": len(files), "sha256": _sha256(data), "files": files}
    meta["skipped"] = skipped
    atomic_write_json(out / f"{stem}.json", meta)
    return meta


def _plan(sources: Sequence[Source], img_size: int, shard_size: int) -> dict:
    h = hashlib.sha256()
    for name, path in sources:
        h.update(f"{name}\0{path}\n".encode())
    return {"format": FORMAT, "img_size": img_size, "shard_size": shard_size, "sources_sha256": h.hexdigest()}


def _clear(out: Path) -> None:
    for p in [*out.glob("shard-*.npy"), *out.glob("shard-*.json"), out / INDEX_FILE, out / FILES_FILE]:
        p.unlink(missing_ok=True)


def build_shards(
    sources: Sequence[Source],
    out: Path,
    img_size: int = 112,
    shard_size: int = 10_000,
    skipped: Sequence[dict] = (),
    workers: int = 1,
    progress: Progress | None = None,
) -> Path:
    """Write `sources` as shards in `out` and return the index path; see the module doc.

    `skipped` lists sources left out before decoding (e.g. rejected by alignment), as
    {"file", "reason"}; unreadable sources are added to it. A re-run with the same sources and
    sizes resumes (or returns at once if finished); a re-run with other ones starts afresh.
    """
    out = Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if not sources:
        raise ValueError(f"no images to shard into {out}")
    out.mkdir(parents=True, exist_ok=True)
    plan = {**_plan(sources, img_size, shard_size), "skipped_before": len(skipped)}
    plan_path = out / PLAN_FILE
    old = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else None
    if old == plan and is_shard_dir(out):
        return out / INDEX_FILE
    if old != plan:
        if old is not None:
            log.warning("%s holds shards of other sources or sizes; rebuilding", out)
        _clear(out)
        atomic_write_json(plan_path, plan)

    chunks = [sources[j : j + shard_size] for j in range(0, len(sources), shard_size)]
    metas: dict[int, dict] = {}
    for i in range(len(chunks)):
        done = out / f"{_shard_stem(i)}.json"
        if done.is_file() and (out / f"{_shard_stem(i)}.npy").is_file():
            metas[i] = json.loads(done.read_text(encoding="utf-8"))
    todo = [i for i in range(len(chunks)) if i not in metas]

    def finished(i: int, meta: dict) -> None:
        metas[i] = meta
        if progress is not None:
            progress(len(metas), len(chunks))

    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            finished(i, _build_shard(out, i, chunks[i], img_size))
    else:
        with ProcessPoolExecutor(min(workers, len(todo))) as ex:
            futures = {i: ex.submit(_build_shard, out, i, chunks[i], img_size) for i in todo}
            for i, fut in futures.items():
                finished(i, fut.result())

    names = [n for i in range(len(chunks)) for n in metas[i]["files"]]
    files_text = "".join(f"{n}\n" for n in names)
    atomic_write_text(out / FILES_FILE, files_text)
    index = {
        "format": FORMAT,
        "layout": "uint8 (N, H, W, 3) RGB per shard, .npy",
        "img_size": img_size,
        "shard_size": shard_size,
        "count": len(names),
        "shards": [{k: metas[i][k] for k in ("file", "count", "sha256")} for i in range(len(chunks))],
        "files": FILES_FILE,
        "files_sha256": _sha256(files_text.encode("utf-8")),
        "skipped": [*skipped, *(s for i in range(len(chunks)) for s in metas[i]["skipped"])],
    }
    atomic_write_json(out / INDEX_FILE, index)
    return out / INDEX_FILE


@dataclass(frozen=True)
class ShardIndex:
    """A finished shard folder's index, checked against its shards' headers when read."""

    root: Path
    img_size: int
    files: tuple[str, ...]  # the shards' files in order
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    skipped: tuple[dict, ...]
    fingerprint: str  # sha256 of index.json: a resumed run checks it trains on the same shards

    @classmethod
    def read(cls, root: Path) -> ShardIndex:
        root = Path(root)
        path = root / INDEX_FILE
        try:
            raw = path.read_bytes()
            index = json.loads(raw)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the shard index ({e})") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
        img_size = int(index["img_size"])
        for s in index["shards"]:
            shard = root / s["file"]
            try:
                shape = np.load(shard, mmap_mode="r").shape
            except (OSError, ValueError) as e:
                raise ValueError(f"{shard}: cannot read shard ({e})") from None
            if shape != (s["count"], img_size, img_size, 3):
                raise ValueError(f"{shard}: shape {shape}, the index says ({s['count']}, {img_size}, ...)")
        return cls(
            root,
            img_size,
            tuple(s["file"] for s in index["shards"]),
            tuple(int(s["count"]) for s in index["shards"]),
            tuple(s["sha256"] for s in index["shards"]),
            tuple(index["skipped"]),
            _sha256(raw),
        )

    def names(self) -> list[str]:
        """Source name of every image, in order (read from files.txt on demand: it can be large)."""
        return (self.root / FILES_FILE).read_text(encoding="utf-8").splitlines()

    def verify(self) -> list[str]:
        """Shards whose bytes no longer match their sha256 (reads every shard in full)."""
        bad = []
        for name, digest in zip(self.files, self.sha256, strict=True):
            h = hashlib.sha256()
            with (self.root / name).open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                bad.append(name)
        return bad


class ShardReader:
    """Random access by global image index to memory-mapped shards, as uint8 (B, 3, S, S).

    Shards are mapped lazily and per process (the maps are not pickled), so DataLoader workers each
    map what they read and the operating system's page cache is shared between them.
    """

    def __init__(self, root: Path, img_size: int | None = None):
        self.index = ShardIndex.read(root)
        if img_size is not None and img_size != self.index.img_size:
            raise ValueError(
                f"{root}: shards hold {self.index.img_size}px images, the run wants {img_size}px; "
                f"rebuild them with --img-size {img_size}"
            )
        self.img_size = self.index.img_size
        self.starts = np.cumsum((0, *self.index.counts))
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._maps:
            self._maps[s] = np.load(self.index.root / self.index.files[s], mmap_mode="r")
        return self._maps[s]

    def read(self, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.img_size, self.img_size, 3), np.uint8)
        for j, (s, i) in enumerate(zip(shard, indices, strict=True)):
            out[j] = self._shard(int(s))[i - self.starts[s]]
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}
