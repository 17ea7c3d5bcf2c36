"""MAE pre-training on CPU with a tiny model and 64 real faces (the bundled demo sample)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fahr_core.cohort import demo_faces_dir
from fahr_core.faces.images import load_face, to_input
from fahr_core.models.checkpoint import load_encoder_weights, load_weights
from fahr_core.models.mae import MAE
from fahr_core.models.vit import SurvivalViT
from fahr_core.train.pretrain import (
    PretrainConfig,
    export_encoder,
    list_images,
    load_checkpoint,
    pretrain,
    reconstruction_figure,
)
from fahr_core.train.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="vit_micro", decoder_dim=64, decoder_depth=1, decoder_heads=4)
CFG = PretrainConfig(
    **TINY,
    img_size=112,
    batch_size=8,
    base_lr=1.2e-2,  # lr 3.75e-4 at global batch 8
    warmup_steps=5,
    total_steps=30,
    checkpoint_every=10,
    log_every=10,
    num_workers=0,
    seed=0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared, busy CPU, torch's default threads contend and a step is ~40x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory) -> Path:
    """64 real faces in identity folders (WebFace42M layout), linked from the demo sample."""
    src = sorted((demo_faces_dir() / "images").glob("*.jpg"))[:64]
    assert len(src) == 64
    root = tmp_path_factory.mktemp("faces")
    for i, p in enumerate(src):
        ident = root / f"id{i % 8:03d}"
        ident.mkdir(exist_ok=True)
        (ident / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="module")
def full_run(faces_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full")
    return out, pretrain(CFG, faces_dir, out, echo=lambda s: None)


def _faces(faces_dir: Path, n: int) -> np.ndarray:
    return np.stack([load_face(p, 112) for p in sorted(faces_dir.rglob("*.jpg"))[:n]])


def test_masking_keeps_a_quarter_and_loss_is_on_masked_patches_only(faces_dir):
    torch.manual_seed(0)
    mae = MAE(**TINY, img_size=112)
    x = to_input(_faces(faces_dir, 8))
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(1))
    assert mae.len_keep == 12 and mask.shape == (8, 49)
    assert torch.all(mask.sum(dim=1) == 37) and set(mask.unique().tolist()) == {0.0, 1.0}

    target = mae.patchify(x)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    manual = torch.stack(
        [((pred[i][mask[i] == 1] - target[i][mask[i] == 1]) ** 2).mean() for i in range(8)]
    ).mean()
    assert torch.allclose(loss, manual, rtol=1e-5)

    # Predictions of visible patches do not enter the loss; those of masked patches do.
    visible = pred.detach().clone()
    visible[mask == 0] += 10.0
    assert torch.allclose(mae.loss(x, visible, mask), loss, rtol=1e-6)
    masked = pred.detach().clone()
    masked[mask == 1] += 1.0
    assert mae.loss(x, masked, mask) > loss + 0.5
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)


def test_loss_falls_and_curve_is_written(full_run):
    out, summary = full_run
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 30 and summary["images_seen"] == 240
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    rows = (out / "loss_curve.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_s" and len(rows) == 31
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_resume_matches_an_uninterrupted_run(full_run, faces_dir, tmp_path):
    _, full = full_run
    # Two DataLoader workers here and none in the full run: the data order must not depend on it.
    cfg = replace(CFG, num_workers=2)
    first = pretrain(cfg, faces_dir, tmp_path, stop_at=13, echo=lambda s: None)
    assert first["steps"] == 13
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["index"]) == (13, 1, 5)  # 8 micro-batches per epoch
    second = pretrain(cfg, faces_dir, tmp_path, resume=True, echo=lambda s: None)
    assert second["steps"] == 30
    np.testing.assert_allclose(
        [h["loss"] for h in second["history"]], [h["loss"] for h in full["history"]], rtol=1e-5
    )
    np.testing.assert_allclose(
        [h["lr"] for h in second["history"]], [h["lr"] for h in full["history"]], rtol=1e-9
    )


def test_shards_train_like_the_folder_and_resume_exactly(full_run, faces_dir, tmp_path):
    """The same faces as shards (3 of them): the same losses as the folder-fed run, across a resume."""
    _, full = full_run
    shards = tmp_path / "shards"
    build_shards([(n, faces_dir / n) for n in list_images(faces_dir)], shards, shard_size=25)
    first = pretrain(CFG, shards, tmp_path / "run", stop_at=13, echo=lambda s: None)
    np.testing.assert_allclose(
        [h["loss"] for h in first["history"]], [h["loss"] for h in full["history"][:13]], rtol=1e-6
    )
    assert not (tmp_path / "run" / "files.txt").exists()  # the shard index is the file list
    # Resumed with two DataLoader workers, each mapping the shards itself.
    second = pretrain(replace(CFG, num_workers=2), shards, tmp_path / "run", resume=True, echo=lambda s: None)
    np.testing.assert_allclose(
        [h["loss"] for h in second["history"]], [h["loss"] for h in full["history"]], rtol=1e-5
    )
    # Other shards under the same run folder: refused rather than silently trained on.
    build_shards([(n, faces_dir / n) for n in list_images(faces_dir)[:40]], shards, shard_size=25)
    with pytest.raises(ValueError, match="not the images"):
        pretrain(replace(CFG, total_steps=31), shards, tmp_path / "run", resume=True, echo=lambda s: None)


def test_two_processes_match_one_with_the_same_global_batch(faces_dir, tmp_path):
    steps = ["--total-steps", "6", "--warmup-steps", "2", "--base-lr", "0.012", "--seed", "3"]
    common = ["--arch", "vit_micro", "--decoder-dim", "64", "--decoder-depth", "1", "--decoder-heads", "4"]
    common += ["--workers", "0", "--log-every", "1", *steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two += [
        "-m",
        "fahr_research.pretrain",
        "pretrain",
        "--data",
        str(faces_dir),
        "--out",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(
        [*two, *common, "--batch-size", "4"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = [sys.executable, "-m", "fahr_research.pretrain", "pretrain"]
    one += ["--data", str(faces_dir), "--out", str(tmp_path / "one")]
    done = subprocess.run(
        [*one, *common, "--batch-size", "8"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = load_checkpoint(tmp_path / "ddp/checkpoint.pt"), load_checkpoint(tmp_path / "one/checkpoint.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["images_seen"] == b["images_seen"] == 48
    np.testing.assert_allclose(
        [h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], rtol=1e-4
    )
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_export_encoder_loads_into_a_survival_vit(full_run, tmp_path):
    out, summary = full_run
    path = export_encoder(out / "checkpoint.pt", tmp_path / "encoder.safetensors")
    saved = load_weights(path)
    assert not any(k.startswith(("decoder", "mask_token")) for k in saved)
    model = SurvivalViT("vit_micro", 112)
    load_encoder_weights(model.encoder, path)
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, trained[f"encoder.{k}"]), k
    card = (tmp_path / "encoder.md").read_text()
    assert "steps: 30" in card and "images seen: 240" in card and "final loss" in card


def test_reconstruction_figure(full_run, faces_dir, tmp_path):
    out, _ = full_run
    mae = MAE(**TINY, img_size=112)
    mae.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    png = reconstruction_figure(mae, _faces(faces_dir, 4), tmp_path / "recon.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
