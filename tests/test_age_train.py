"""FAHR-FaceAge training: layer-wise lr decay, and `fahr age train` / `eval` on real, aligned faces."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fahr_core.age.evaluate import age_metrics
from fahr_core.age.model import AgeViT, load_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.train import AgeTrainConfig, interpolate_, llrd_param_groups, train_age_model
from fahr_core.age.views import CENTRED
from fahr_core.age.workflow import evaluate_on_folder
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.models import shipped
from fahr_research.cli import app as fahr_app

runner = CliRunner()


def test_layer_wise_lr_decay_groups() -> None:
    model = AgeViT("vit_micro", 112)  # 4 blocks
    groups = llrd_param_groups(model, layer_decay=0.5, weight_decay=0.05)
    scale = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["names"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(scale) == sorted(trainable)  # each trainable parameter in exactly one group
    assert "encoder.pos_embed" not in scale and "encoder.cls_token" not in scale  # frozen
    assert scale["head.weight"] == (1.0, 0.05) and scale["head.bias"] == (1.0, 0.0)
    assert scale["encoder.fc_norm.weight"] == (1.0, 0.0)
    assert scale["encoder.blocks.3.attn.qkv.weight"] == (0.5, 0.05)
    assert scale["encoder.blocks.0.mlp.fc1.bias"] == (0.5**4, 0.0)
    assert scale["encoder.patch_embed.proj.weight"] == (0.5**5, 0.05)


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="shift"):
        AgeTrainConfig(shift=56)
    with pytest.raises(ValueError, match="at least one epoch"):
        AgeTrainConfig(epochs=0, balanced_epochs=0)
    with pytest.raises(ValueError, match="layer_decay"):
        AgeTrainConfig(layer_decay=0.0)
    with pytest.raises(ValueError, match="balanced_weight"):
        AgeTrainConfig(balanced_weight=1.5)


def test_interpolate_moves_every_float_weight_between_the_ends() -> None:
    torch.manual_seed(0)
    start, end = AgeViT("vit_micro", 112, 40.0, 10.0), AgeViT("vit_micro", 112, 40.0, 10.0)
    a = {k: v.clone() for k, v in start.state_dict().items()}
    b = {k: v.clone() for k, v in end.state_dict().items()}
    interpolate_(end, a, 0.25)
    got = end.state_dict()
    for name, value in got.items():
        assert torch.allclose(value, 0.75 * a[name] + 0.25 * b[name], atol=1e-6), name
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the two ends differ, so the mean is a test


def _final_state(out: Path, cfg: AgeTrainConfig, data: tuple[np.ndarray, ...]) -> dict[str, torch.Tensor]:
    train_age_model(cfg, *data, out, echo=lambda _: None)
    return load_age_model(out / "model_final.safetensors").state_dict()


def test_final_model_is_the_weighted_mean_of_both_stage_ends(tmp_path) -> None:
    """Three runs of one seed: the general stage alone, both stages kept whole, both averaged."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 3, 112, 112), dtype=np.uint8)
    ages = rng.uniform(1, 90, 48)
    data = (x[:32], ages[:32], x[32:], ages[32:])
    base = AgeTrainConfig(arch="vit_micro", epochs=1, balanced_epochs=1, batch_size=16, lr=3e-3, shift=2)
    general = _final_state(tmp_path / "g", AgeTrainConfig(**{**base.__dict__, "balanced_epochs": 0}), data)
    balanced = _final_state(tmp_path / "b", AgeTrainConfig(**{**base.__dict__, "balanced_weight": 1.0}), data)
    mean = _final_state(tmp_path / "m", AgeTrainConfig(**{**base.__dict__, "balanced_weight": 0.3}), data)
    assert any(not torch.equal(general[n], balanced[n]) for n in general)
    for name, value in mean.items():
        assert torch.allclose(value, 0.7 * general[name] + 0.3 * balanced[name], atol=1e-5), name
    with (tmp_path / "m" / "curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [r["stage"] for r in curve] == ["general", "balanced", "average"]
    model = load_age_model(tmp_path / "m" / "model_final.safetensors")
    scored = age_metrics(data[3], predict_ages(model, data[2], shifts=CENTRED))
    assert float(curve[-1]["val_mae"]) == pytest.approx(scored["mae"], abs=1e-3)
    with (tmp_path / "b" / "curve.csv").open() as f:
        assert [r["stage"] for r in csv.DictReader(f)] == ["general", "balanced"]  # weight 1: no mean


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labels.csv folder of 150 bundled faces (every decade the sample has)."""
    folder = tmp_path_factory.mktemp("labelled")
    faces = load_labelled_faces(demo_faces_dir())[::2][:150]
    (folder / "images").mkdir()
    rows = ["file,age,sex,race"]
    for f in faces:
        shutil.copy(f.path, folder / "images" / f.path.name)
        rows.append(f"images/{f.path.name},{f.age:g},{f.sex},{f.race}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory) -> Path:
    """`fahr age train` from the demo encoder: 3 general epochs then 1 balanced, in one command."""
    out = tmp_path_factory.mktemp("age-run")
    torch.set_num_threads(1)
    init = shipped.AGE_ENCODER
    args = ["age", "train", "--data", str(labelled), "--out", str(out / "run"), "--init", str(init)]
    args += ["--arch", "vit_micro", "--epochs", "3", "--balanced-epochs", "1", "--batch-size", "16"]
    args += ["--lr", "3e-3", "--aligned", str(out / "aligned"), "--workers", "1"]
    result = runner.invoke(fahr_app, args)
    assert result.exit_code == 0, result.output
    assert "balanced epoch 1/1" in result.output
    return out


@pytest.mark.slow
def test_train_writes_models_curve_split_and_report(trained, labelled) -> None:
    run = trained / "run"
    with (run / "curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [(r["stage"], r["epoch"]) for r in curve] == [
        ("general", "1"),
        ("general", "2"),
        ("general", "3"),
        ("balanced", "1"),
        ("average", "1"),
    ]
    l1 = [float(r["train_l1"]) for r in curve[:3]]  # the average row trains nothing
    assert l1[2] < l1[0]  # the L1 falls
    best = load_age_model(run / "model_best.safetensors")
    assert best.arch == "vit_micro" and (run / "model_best.md").is_file()
    assert (run / "model_final.safetensors").is_file()
    best_mae = min(float(r["val_mae"]) for r in curve)  # the curve scores the face and its mirror only
    assert f"best_val_mae: {best_mae:g}" in (run / "model_best.md").read_text()
    # validation/ is the best model's evaluation on the validation part, with every test-time view
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    best_model, aligned = run / "model_best.safetensors", trained / "aligned"
    again = evaluate_on_folder(best_model, labelled, trained / "again", "validation", aligned_dir=aligned)
    assert metrics["mae"] == pytest.approx(again["mae"], abs=1e-9) and metrics["n"] == again["n"]
    with (run / "split.csv").open() as f:
        split = list(csv.DictReader(f))
    assert (
        len(split) == 150
        and sum(r["part"] == "validation" for r in split) == metrics["n"] + metrics["rejected_by_qc"]
    )


@pytest.mark.slow
def test_eval_matches_an_independent_computation(trained, labelled) -> None:
    out = trained / "eval"
    model = trained / "run" / "model_best.safetensors"
    args = ["age", "eval", "--model", str(model), "--data", str(labelled)]
    args += ["--out", str(out), "--aligned", str(trained / "aligned"), "--workers", "1"]
    result = runner.invoke(fahr_app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert metrics["n"] == len(rows) and metrics["n"] + metrics["rejected_by_qc"] == 150
    err = {r["file"]: abs(float(r["predicted_age"]) - float(r["age"])) for r in rows}
    assert metrics["mae"] == pytest.approx(np.mean(list(err.values())), abs=0.01)
    decades: dict[int, list[float]] = {}
    for r in rows:
        decades.setdefault(min(int(float(r["age"])) // 10, 9), []).append(err[r["file"]])
    per_decade = np.mean([np.mean(v) for v in decades.values()])
    assert metrics["mean_decade_mae"] == pytest.approx(per_decade, abs=0.01)
    women = [err[r["file"]] for r in rows if r["sex"] == "F"]
    assert metrics["by_sex"]["F"]["n"] == len(women)
    assert metrics["by_sex"]["F"]["mae"] == pytest.approx(np.mean(women), abs=0.01)
    assert (out / "error_vs_age.png").read_bytes()[:4] == b"\x89PNG"
    assert f"MAE {metrics['mae']:.2f} y" in result.output


def test_train_names_bad_labels(tmp_path, labelled) -> None:
    shutil.copytree(labelled, tmp_path / "bad")
    labels = tmp_path / "bad" / "labels.csv"
    lines = labels.read_text().splitlines()
    cells = lines[4].split(",")
    lines[4] = ",".join([cells[0], "old", *cells[2:]])
    labels.write_text("\n".join(lines) + "\n")
    args = ["age", "train", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "run")]
    result = runner.invoke(fahr_app, args)
    assert result.exit_code == 2
    assert "labels.csv line 5: age 'old'" in result.output
