"""Face shards: they hold exactly the decoded photos, name what they skipped, and survive a kill."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fahr_core.cohort import demo_faces_dir
from fahr_core.faces.images import load_face
from fahr_core.train.pretrain import list_images
from fahr_core.train.shards import ShardIndex, ShardReader, build_shards
from fahr_research.cli import app as fahr_app

runner = CliRunner()


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    """WebFace42M layout: 10 real faces in 3 identity folders, one of them 200x200 (not 112)."""
    src = sorted((demo_faces_dir() / "images").glob("*.jpg"))[:10]
    root = tmp_path / "faces"
    for i, p in enumerate(src):
        (root / f"id{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"id{i % 3}" / p.name).symlink_to(p)
    Image.open(src[0]).resize((200, 200)).save(root / "id0" / "big.jpg")
    return root


def _sources(root: Path) -> list[tuple[str, Path]]:
    return [(n, root / n) for n in list_images(root)]


def test_shards_hold_exactly_the_decoded_photos_in_order(faces, tmp_path):
    sources = _sources(faces)
    build_shards(sources, tmp_path / "shards", shard_size=4)
    index = ShardIndex.read(tmp_path / "shards")
    assert index.counts == (4, 4, 3) and index.img_size == 112 and not index.skipped
    assert index.names() == [n for n, _ in sources]
    reader = ShardReader(tmp_path / "shards", 112)
    order = np.array([7, 0, 10, 3, 4])  # across all three shards, out of order
    got = reader.read(order)
    want = np.stack([load_face(sources[i][1], 112) for i in order])
    assert got.dtype == np.uint8 and got.shape == (5, 3, 112, 112)
    np.testing.assert_array_equal(got, want)
    assert np.load(tmp_path / "shards" / "shard-00000.npy").shape == (4, 112, 112, 3)  # HWC on disk
    assert index.verify() == []


def test_shards_are_the_same_bytes_whichever_processes_decode_them(faces, tmp_path):
    """The model build decodes with all its workers and a rebuild must reproduce its shards."""
    one = build_shards(_sources(faces), tmp_path / "one", shard_size=4, workers=1)
    two = build_shards(_sources(faces), tmp_path / "two", shard_size=4, workers=2)
    assert one.read_bytes() == two.read_bytes()  # the index: names, counts and each shard's sha256
    for shard in sorted((tmp_path / "one").glob("shard-*.npy")):
        assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_corrupt_and_unreadable_photos_are_skipped_and_named(faces, tmp_path):
    (faces / "id1" / "truncated.jpg").write_bytes((faces / "id0" / "big.jpg").read_bytes()[:300])
    (faces / "id2" / "notes.jpg").write_text("not a photo")
    build_shards(_sources(faces), tmp_path / "shards", shard_size=5)
    index = ShardIndex.read(tmp_path / "shards")
    skipped = {s["file"]: s["reason"] for s in index.skipped}
    assert set(skipped) == {"id1/truncated.jpg", "id2/notes.jpg"}
    assert all("cannot read photo" in r for r in skipped.values())
    assert sum(index.counts) == 11 and "id1/truncated.jpg" not in index.names()


def test_a_killed_build_resumes_and_other_sources_rebuild(faces, tmp_path):
    out = tmp_path / "shards"
    sources = _sources(faces)
    build_shards(sources, out, shard_size=4)
    whole = (out / "index.json").read_bytes()
    # As if killed while writing shard 1: its .npy may be there, its completion marker is not,
    # a temporary file is left behind, and there is no index.
    (out / "shard-00001.json").unlink()
    (out / "index.json").unlink()
    (out / ".shard-00001.npy.x.tmp").write_bytes(b"half")
    with pytest.raises(ValueError, match="cannot read the shard index"):
        ShardReader(out)
    kept = (out / "shard-00000.npy").stat().st_mtime_ns
    build_shards(sources, out, shard_size=4)
    assert (out / "shard-00000.npy").stat().st_mtime_ns == kept  # finished shards are not redone
    assert (out / "index.json").read_bytes() == whole

    build_shards(sources[:6], out, shard_size=4)  # other sources: a clean rebuild, no stale shard
    index = ShardIndex.read(out)
    assert index.counts == (4, 2) and sorted(p.name for p in out.glob("shard-*.npy")) == [
        "shard-00000.npy",
        "shard-00001.npy",
    ]


def test_verify_and_read_catch_damaged_shards(faces, tmp_path):
    out = tmp_path / "shards"
    build_shards(_sources(faces), out, shard_size=4)
    shard = out / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ShardIndex.read(out).verify() == ["shard-00001.npy"]
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="shard-00001.npy"):
        ShardIndex.read(out)
    build_shards(_sources(faces), out, shard_size=5)
    with pytest.raises(ValueError, match="rebuild them with --img-size 64"):
        ShardReader(out, img_size=64)


def test_cli_aligns_first_and_lists_rejections(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for p in sorted((demo_faces_dir() / "images").glob("*.jpg"))[:4]:
        (src / p.name).symlink_to(p)
    Image.new("RGB", (160, 160), (90, 120, 150)).save(src / "wall.jpg")  # no face
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "shards"
    args = ["shards", "build", "--src", str(src), "--out", str(out), "--align", "--shard-size", "3"]
    result = runner.invoke(fahr_app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    reasons = {s["file"]: s["reason"] for s in index["skipped"]}
    assert reasons.keys() == {"wall.jpg", "broken.jpg"}
    assert "unreadable" in reasons["broken.jpg"] and reasons["wall.jpg"].startswith("alignment: ")
    assert index["count"] == 4 and (out / "alignment" / "alignment.csv").is_file()
    assert f"4 images in 2 shards in {out}; 2 skipped" in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(fahr_app, ["shards", "build", "--src", str(empty), "--out", str(out)])
    assert result.exit_code == 2 and "no images found" in result.output
