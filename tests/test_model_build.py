"""`fahr models build` end to end on a few real faces with tiny steps: every stage, resume, outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fahr_client.simulation import fedavg
from fahr_core.age.model import load_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.train import FINAL_MODEL
from fahr_core.config import ModelConfig, load_server_config, model_table, server_config_from_dict
from fahr_core.models import shipped
from fahr_core.models.initial import initial_model
from fahr_core.train.pretrain import load_checkpoint
from fahr_research.cli import app
from fahr_research.local import demo_server_toml, local_credentials
from fahr_research.models import (
    AGE_ENCODER,
    CHOICE,
    DEFAULT_STAGES,
    DONE,
    MAE_ENCODER,
    STAGES,
    SUMMARY,
    SURVIVAL_ENCODER,
    WARM_STARTS,
    ModelBuild,
    Recipe,
    _wait_for_all_or_a_failure,
    demo_face_names,
    recipe_from_json,
    smoke_recipe,
)

TINY = replace(
    smoke_recipe(Recipe()),
    site_sizes=(18, 16),
    site_mean_ages=(40.0, 60.0),
    site_rates=(0.5, 0.5),
    warm_start_seeds=(0,),
)


@pytest.fixture(scope="module")
def faces(shared_utkface: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 shared UTKFace faces (adults, a seeded draw) plus 10 demo faces, in the labels layout."""
    with (shared_utkface / "labels.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["sex"] and 18 <= float(r["age"]) <= 90]
    demo = demo_face_names()
    others = [r for r in rows if Path(r["file"]).name not in demo]
    pick = [others[i] for i in np.random.default_rng(0).permutation(len(others))[:240]]
    pick += [r for r in rows if Path(r["file"]).name in demo][:10]
    out = tmp_path_factory.mktemp("faces")
    (out / "images").mkdir()
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "sex", "race"])
        for r in pick:
            shutil.copyfile(shared_utkface / r["file"], out / "images" / Path(r["file"]).name)
            w.writerow([f"images/{Path(r['file']).name}", r["age"], r["sex"], r["race"]])
    return out


def test_fedavg_is_the_example_weighted_mean() -> None:
    a = {"w": torch.tensor([0.0, 3.0])}
    b = {"w": torch.tensor([4.0, 6.0])}
    assert torch.allclose(fedavg([a, b], [3, 1])["w"], torch.tensor([1.0, 3.75]))


def test_recipe_json_overrides_and_rejects_unknown_fields(tmp_path: Path) -> None:
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"mae_steps": 7, "site_sizes": [5, 6], "age_cap": 5, "balanced_weight": 0.2}))
    r = recipe_from_json(good)
    assert (r.mae_steps, r.site_sizes, r.arch) == (7, (5, 6), Recipe().arch)
    # the balanced stage's oversampling cap and its share of the final model reach the trainer
    assert (r.age_config().cap, r.age_config().balanced_weight) == (5, 0.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mae_stepz": 7}))
    with pytest.raises(ValueError, match="mae_stepz"):
        recipe_from_json(bad)


def _choice(out: Path, name: str) -> ModelConfig:
    """The [model] table expected for start `name` of the build in `out`."""
    spec = ModelConfig(arch=TINY.arch, img_size=TINY.img_size, finetune="last:1")
    if name == "age-head":
        return replace(spec, init_age_model=str((out / "age" / "model_final.safetensors").resolve()))
    return replace(spec, encoder_checkpoint=str((out / "warm-start" / SURVIVAL_ENCODER).resolve()))


def test_a_model_table_loads_back_as_the_spec_it_was_written_from(tmp_path: Path) -> None:
    encoder = tmp_path / 'a "quoted"\\ name\twith\na newline.safetensors'  # a path may hold anything
    encoder.write_bytes(shipped.AGE_ENCODER.read_bytes())
    spec = ModelConfig(
        arch="vit_tiny",
        img_size=64,
        n_intervals=6,
        finetune="ffa-lora",
        lora_rank=4,
        lora_targets="qkv,fc1",
        wire_dtype="bfloat16",
        init_log_hr_per_year=0.05,
        encoder_checkpoint=str(encoder),
    )
    table = model_table(replace(spec, base_sha256="ab" * 32))  # the server's own, never in a file
    assert "lora_alpha" not in table and "base_sha256" not in table  # a default says nothing new
    assert server_config_from_dict(tomllib.loads(table), "t.toml", tmp_path).model == spec
    # the architecture is always named, even the default one: the table says what it builds
    assert tomllib.loads(model_table(ModelConfig()))["model"] == {"arch": ModelConfig().arch}


def test_models_shipped_prints_a_server_table_that_starts_from_the_shipped_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["models", "shipped"])
    assert result.exit_code == 0, result.output
    for file in (shipped.AGE_MODEL, shipped.MAE_ENCODER, shipped.AGE_ENCODER):
        assert str(file) in result.output and file.with_suffix(".md").is_file()
    server_toml = tmp_path / "server.toml"
    server_toml.write_text("[federation]\nrounds = 3\n" + result.output)
    spec = load_server_config(server_toml).model
    assert spec == shipped.start_spec() and spec.finetune == "last:1"
    assert spec.init_age_model == spec.age_checkpoint == str(shipped.AGE_MODEL)
    assert initial_model(spec).head.risk.weight.abs().sum() > 0  # the age head, folded in


def test_the_demos_server_starts_from_the_shipped_models_wherever_its_folder_is(tmp_path: Path) -> None:
    out = tmp_path / 'demo "run" \\ 1'  # `fahr demo --out` is the user's: a quote or backslash in it
    security, _ = local_credentials(out / "certs", ["maastro", "boston"], 8123)
    server_toml = out / "server.toml"
    server_toml.write_text(demo_server_toml(3, 2, 8123, security))
    cfg = load_server_config(server_toml)
    assert cfg.model == shipped.start_spec()
    assert (cfg.rounds, cfg.min_sites, cfg.port, cfg.workdir) == (3, 2, 8123, (out / "server").resolve())
    assert cfg.security is not None and cfg.security.ca_cert.is_file()
    assert [p.name for p in cfg.security.site_keys] == ["maastro.pub", "boston.pub"]


@pytest.mark.slow
def test_build_runs_every_stage_and_resumes(faces: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    lines: list[str] = []
    summary = ModelBuild(faces, out, TINY, workers=1, echo=lines.append).run()
    # the default build is the shipped models' chain; the random-init comparison waits to be named
    assert list(summary["stages"]) == list(DEFAULT_STAGES) and not (out / "age-random").exists()
    assert summary["stages"]["age"]["threads"] == 1
    # named, it runs in the same folder; a run of every stage writes build.json with all of them
    assert list(ModelBuild(faces, out, TINY, workers=1).run(["age-random"])["stages"]) == ["age-random"]
    summary = ModelBuild(faces, out, TINY, workers=1, echo=lines.append).run(STAGES)
    assert list(summary["stages"]) == list(STAGES)
    assert json.loads((out / SUMMARY).read_text())["stages"] == summary["stages"]
    stages = summary["stages"]
    # the demo faces are never trained on: neither in the MAE shards nor in the age model's faces
    shard_names = (out / "shards" / "train" / "files.txt").read_text().split()
    assert shard_names and not set(shard_names) & demo_face_names()
    assert stages["shards"]["train_faces"] == len(shard_names)
    split = list(csv.DictReader((out / "split.csv").open()))
    validation = {Path(r["file"]).name for r in split if r["part"] == "validation"}
    assert not validation & set(shard_names)  # pre-training never sees a validation face
    assert int(load_age_model(out / "age" / "model_final.safetensors").age_mean) > 0
    card = (out / "age" / "model_final.md").read_text()
    assert f"train_faces: {stages['shards']['train_faces']}" in card
    # both arms scored on the same validation faces, from different initialisations
    for arm, init in (("age", "mae"), ("age-random", "random")):
        metrics = json.loads((out / arm / "validation" / "metrics.json").read_text())
        assert metrics["n"] == len(
            [r for r in split if r["part"] == "validation" and r["status"] == "aligned"]
        )
        assert stages[arm]["init"] == init
        assert (out / arm / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "mae" / "loss_curve.png").is_file()
    # the warm start is one of the three candidates, picked by the highest mean held-out C, and
    # choice.toml is a server's [model] table that starts from it
    ws = stages["warm-start"]
    assert ws["chosen"] == max(ws["mean_c"], key=ws["mean_c"].get)
    assert sorted(p.name for p in (out / "warm-start").glob("arm-*.json")) == [
        "arm-0-age-head.json",
        "arm-0-age.json",
        "arm-0-mae.json",
    ]
    assert load_server_config(out / "warm-start" / CHOICE).model == _choice(out, ws["chosen"])
    # whichever start wins, its choice.toml configures a server that builds it from this build's files
    build = ModelBuild(faces, out, TINY, workers=1, echo=lines.append)
    encoders = {"mae": out / "mae" / MAE_ENCODER, "age": out / "warm-start" / AGE_ENCODER}
    for name in WARM_STARTS:
        build.write_choice(name, "test")
        chosen = load_server_config(out / "warm-start" / CHOICE).model
        assert chosen == _choice(out, name)
        initial_model(chosen)  # the file it names is an encoder or age model of the recipe's arch
        if name in encoders:
            assert Path(chosen.encoder_checkpoint).read_bytes() == encoders[name].read_bytes()
    # a re-run skips every complete stage; removing one stage's marker re-runs only that stage
    (out / "age-random" / DONE).unlink()
    lines.clear()
    ModelBuild(faces, out, TINY, workers=1, echo=lines.append).run(STAGES)
    skipped = [line for line in lines if line.endswith("complete, skipped")]
    assert len(skipped) == 4 and any(line.startswith("[age-random] 2") for line in lines)
    assert json.loads((out / "age-random" / DONE).read_text())["pid"] == os.getpid()
    # with jobs=2 and both age stages to run, age-random runs in a second process beside the age
    # model, one core each; every other warm-start arm runs in a second process too
    for done in ("age", "age-random", "warm-start"):
        (out / done / DONE).unlink()
    for arm in (out / "warm-start").glob("arm-*.json"):
        arm.unlink()
    summary = ModelBuild(faces, out, TINY, workers=1, echo=lines.append, jobs=2).run(STAGES)
    assert list(summary["stages"]) == list(STAGES)
    age, age_random = summary["stages"]["age"], summary["stages"]["age-random"]
    assert (age["pid"], age["threads"]) == (os.getpid(), 1)
    assert age_random["pid"] not in (os.getpid(), None) and age_random["threads"] == 1
    arm_pids = {json.loads(p.read_text())["pid"] for p in (out / "warm-start").glob("arm-*.json")}
    assert os.getpid() in arm_pids and len(arm_pids) == 2
    # with nothing to run beside it (age complete), age-random runs here on both cores' threads
    # and gives them back after
    (out / "age-random" / DONE).unlink()
    summary = ModelBuild(faces, out, TINY, workers=1, echo=lines.append, jobs=2).run(STAGES)
    age_random = summary["stages"]["age-random"]
    assert (age_random["pid"], age_random["threads"]) == (os.getpid(), 2) and torch.get_num_threads() == 1


@pytest.mark.slow
def test_two_jobs_pretrain_as_two_ranks_that_train_like_one_process(faces: Path, tmp_path: Path) -> None:
    """jobs=2: the MAE stage runs as two torch.distributed processes, each with half the batch,
    and ends where the one-process stage does (same images, masks and steps), so a build on both
    cores ships the same encoder in about half the time."""
    torch.set_num_threads(1)
    one = ModelBuild(faces, tmp_path / "one", TINY, workers=1, echo=lambda s: None)
    one.run(["shards", "mae"])
    assert not (tmp_path / "one" / SUMMARY).exists()  # build.json only after every default stage
    two = ModelBuild(faces, tmp_path / "two", TINY, one.aligned, workers=1, echo=lambda s: None, jobs=2)
    two.run(["shards", "mae"])
    a, b = (load_checkpoint(out / "mae" / "checkpoint.pt") for out in (tmp_path / "two", tmp_path / "one"))
    assert (a["world_size"], a["config"]["batch_size"], b["world_size"]) == (2, TINY.mae_batch // 2, 1)
    assert a["images_seen"] == b["images_seen"] == TINY.mae_steps * TINY.mae_batch
    losses = [[h["loss"] for h in c["history"]] for c in (a, b)]
    np.testing.assert_allclose(*losses, rtol=1e-4)
    encoders = [load_file(out / "mae" / MAE_ENCODER) for out in (tmp_path / "two", tmp_path / "one")]
    for k, v in encoders[1].items():
        torch.testing.assert_close(encoders[0][k], v, rtol=1e-4, atol=1e-5)
    done = json.loads((tmp_path / "two" / "mae" / DONE).read_text())
    assert (done["steps"], done["final_loss"]) == (TINY.mae_steps, a["history"][-1]["loss"])


def test_a_rank_that_dies_stops_the_mae_stage_instead_of_hanging_it(faces: Path, tmp_path: Path) -> None:
    """jobs=2: when one MAE process dies, the other would wait for it in a collective until gloo's
    timeout (30 minutes); the build must end both at once and name the rank."""
    torch.set_num_threads(1)
    long = replace(TINY, mae_steps=100_000, mae_warmup=10)
    killed: list[int] = []

    def echo(line: str) -> None:
        if m := re.match(r"\[mae\] 2 processes \(pids (\d+), (\d+)\)", line):
            killed.append(int(m.group(2)))
            time.sleep(5.0)  # both ranks started, importing torch or meeting on the port
            os.kill(killed[0], signal.SIGKILL)

    build = ModelBuild(faces, tmp_path / "run", long, workers=1, echo=echo, jobs=2)
    build.run(["shards"])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            build.run(["mae"])
        except BaseException as e:  # handed to the test thread below
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the MAE stage kept waiting for a dead rank"
    assert killed and time.monotonic() - started < 120
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert re.search(r"\[mae\] failed in .*rank 1 \(exit code -9\)", str(errors[0]))
    assert not (tmp_path / "run" / "mae" / DONE).exists()


class _Rank:
    """A stand-in process: its exit codes in the order they are read, then the last for good, and
    a sentinel that is ready once `ended` (a pipe whose writer is closed)."""

    def __init__(self, codes: list[int | None], ended: bool) -> None:
        self.codes = codes
        self.sentinel, writer = os.pipe()
        if ended:
            os.close(writer)

    @property
    def exitcode(self) -> int | None:
        return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]


def test_a_rank_that_dies_between_two_reads_of_the_exit_codes_still_ends_the_wait() -> None:
    """The race the kill test above met once in CI: rank 1 dies after its exit code was read as
    running, before the list of sentinels to wait on is made. Waiting only on ranks read alive a
    second time leaves the living rank 0 alone in the wait, which ends after gloo's 30 minutes."""
    living = _Rank([None], ended=False)  # waits in a collective for the dead one
    dying = _Rank([None, -9], ended=True)
    waiter = threading.Thread(target=_wait_for_all_or_a_failure, args=([living, dying],), daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "the wait missed the death of rank 1"


def test_a_failure_in_the_second_process_fails_the_build_by_name(faces: Path, tmp_path: Path) -> None:
    """jobs=2: an age-random that cannot run in the second process (too few faces for one batch)
    stops the build with an error naming it, instead of a build that goes on as if it had run."""
    torch.set_num_threads(1)
    big_batch = replace(TINY, age_batch=100_000, age_epochs=1, balanced_epochs=0)
    build = ModelBuild(faces, tmp_path / "run", big_batch, workers=1, echo=lambda s: None, jobs=2)
    build.run(["shards"])
    failed = pytest.raises(RuntimeError, match=r"\[age-random\] failed in the second process")
    with failed, build._beside("[age-random]", stages=("age-random",)):
        pass  # the chain's own stages succeed meanwhile


def test_an_age_stage_gives_back_its_threads_when_it_fails(
    faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    build = ModelBuild(faces, tmp_path / "run", TINY, workers=1, echo=lambda s: None, jobs=2)

    def fails(*args: Any) -> dict[str, Any]:
        assert torch.get_num_threads() == 2
        raise ValueError("stopped")

    monkeypatch.setattr(build, "_age", fails)
    with pytest.raises(ValueError, match="stopped"):
        build.run(["age-random"])
    assert torch.get_num_threads() == 1


def test_cli_refuses_a_bad_recipe_in_one_line(faces: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"mae_stepz": 1}))
    args = ["models", "build", "--data", str(faces), "--out", str(tmp_path / "r"), "--recipe", str(recipe)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "mae_stepz" in result.output
    assert not (tmp_path / "r").exists()


def _gpu_recipe() -> Any:
    """benchmarks/gpu_recipe.py as a module (benchmarks/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_recipe.py"
    spec = importlib.util.spec_from_file_location("gpu_recipe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_recipe_parts_go_on_past_a_failure_and_stop_at_the_deadline(tmp_path: Path) -> None:
    """The device gives one shot: a failing part is recorded and the next still runs; a part that
    would start too close to the deadline is skipped; the JSON on disk holds every outcome."""
    module = _gpu_recipe()
    run = module.Parts(tmp_path, 60.0, {"device": "cpu"})
    assert run.run("broken", lambda: 1 / 0) is None
    assert run.run("fine", lambda: {"x": 1}) == {"x": 1}
    assert run.run("too_long", lambda: {"y": 2}, needs=3600.0) is None
    saved = json.loads((tmp_path / module.RESULT_FILE).read_text())
    assert saved["errors"] == {"broken": "ZeroDivisionError: division by zero"}
    assert saved["fine"] == {"x": 1} and "too_long" not in saved and "too_long" in saved["skipped"]
    assert module._vit_s_budgets(run, 150.0, 100.0) == (0.0, 0.0)  # 60 s left: less than the reserve
    roomy = module.Parts(tmp_path, 1e6, {})
    assert module._vit_s_budgets(roomy, 150.0, 100.0) == (150.0, 100.0)
    # MAE modes likewise: each failure recorded, the next mode tried; none started past the deadline
    cpu = torch.device("cpu")
    failed = module.mae_throughput(tmp_path, "no_such_arch", 8, 2, 0, cpu, roomy)
    assert all("unknown arch" in failed[f"{mode}_error"] for mode in module.MAE_MODES)
    late = module.mae_throughput(tmp_path, "vit_micro", 8, 2, 0, cpu, run)
    assert all(f"{mode}_skipped" in late for mode in module.MAE_MODES)
    assert not any(k.endswith("images_per_s") for k in [*failed, *late])
    cut = module.Parts(tmp_path, module.RESERVE_S + 125.0, {})
    mae, age = module._vit_s_budgets(cut, 150.0, 100.0)
    assert 74 < mae < 75 and 49 < age < 50 and mae / age == pytest.approx(1.5)


@pytest.mark.slow
def test_gpu_recipe_runs_end_to_end_on_the_cpu(faces: Path, tmp_path: Path) -> None:
    """benchmarks/gpu_recipe.py --tiny: every part runs and writes its JSON, weights and curves."""
    module = _gpu_recipe()
    torch.set_num_threads(1)
    out, work, packed = tmp_path / "out", tmp_path / "work", tmp_path / "faces.tar"
    # the device machine's way: faces aligned here, packed, and read from the pack there
    module.main(
        ["--data", str(faces), "--pack", str(packed), "--aligned", str(tmp_path / "al"), "--workers", "1"]
    )
    args = ["--tiny", "--faces", str(packed), "--out", str(out), "--work", str(work), "--workers", "1"]
    result = module.main([*args, "--max-file-mib", "0.25"])
    build = module.PackedBuild(packed, tmp_path / "again", module.TINY_RECIPE, 1, print)
    unpacked = ModelBuild(faces, tmp_path / "direct", TINY, tmp_path / "al")
    for part in ("train", "validation"):  # the pack holds the split's faces, WebP-close to the crops
        records, images = build.part(part)
        direct_records, direct_images = unpacked.part(part)
        assert [f.path.name for f in records] == [f.path.name for f in direct_records]
        assert [f.age for f in records] == [f.age for f in direct_records]
        assert np.abs(images.astype(float) - direct_images).mean() < 4.0
    saved = json.loads((out / module.RESULT_FILE).read_text())
    assert "errors" not in saved and "skipped" not in saved
    for mode in module.MAE_MODES:  # eager, compiled (traced forward and backward), the recipe's input
        assert saved["mae_step"][f"{mode}_images_per_s"] > 0
    assert saved["mae_step"]["gflop_per_image"] > 0 and saved["mae_step"]["speed_up"] > 0
    assert saved["input"]["images_per_s"] > 0
    # sized as on the device, the recipe's steps and epochs the most it runs
    sizing = saved["sizing"]
    assert saved["recipe"]["mae_steps"] == sizing["mae_steps"] <= module.TINY_RECIPE.mae_steps
    mae_budget, age_budget = sizing["budgets_s"]
    assert 0 < mae_budget <= 150.0 and mae_budget / age_budget == pytest.approx(1.5, rel=0.01)
    assert saved["age"]["val_mae"] == result["age"]["val_mae"] and saved["age"]["val_by_decade"]
    # what comes back is small and complete: JSON, curves, the age model's weights in parts
    weights = saved["weights"]
    assert len(weights["parts"]) > 1
    assert all((out / p).stat().st_size <= 0.25 * 2**20 for p in weights["parts"])
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [module.RESULT_FILE, "mae_curve.png", "age_curve.png", *weights["parts"]]
    )
    joined = b"".join((out / p).read_bytes() for p in weights["parts"])
    assert hashlib.sha256(joined).hexdigest() == weights["sha256"]
    (tmp_path / weights["file"]).write_bytes(joined)
    shipped, final = load_age_model(tmp_path / weights["file"]), load_age_model(work / "age" / FINAL_MODEL)
    _, val_images = build.part("validation")
    assert np.abs(predict_ages(shipped, val_images) - predict_ages(final, val_images)).max() < 0.5
    site = saved["site"]  # a site's DP round where a site trains: on this machine, its CPU
    assert site["device"] == "cpu" and site["dp_steps"] >= 3 and site["dp_images_per_s"] > 0
    assert 0 < site["epsilon"] <= 8.0 and all(0.0 <= site[c] <= 1.0 for c in ("c_start", "c_trained"))
    # the device run's sizing: steps and epochs cut to the budgets, never above the recipe's own
    shards, n_train = work / "shards" / "train", len(build.part("train")[0])
    most = replace(module.TINY_RECIPE, mae_steps=400, mae_warmup=300, age_epochs=30, balanced_epochs=6)
    cut, timing = module.sized_recipe(most, shards, n_train, (0.2, 0.2), 1e9, torch.device("cpu"))
    assert 20 <= cut.mae_steps < 400 and cut.mae_warmup == cut.mae_steps // 10
    assert cut.age_epochs >= 1 and cut.balanced_epochs >= 1 and cut.age_epochs + cut.balanced_epochs < 36
    assert timing["mae_steps"] == cut.mae_steps and timing["mae_eager_images_per_s"] > 0
    roomy, _ = module.sized_recipe(most, shards, n_train, (1e6, 1e6), 1e9, torch.device("cpu"))
    assert (roomy.mae_steps, roomy.mae_warmup, roomy.age_epochs, roomy.balanced_epochs) == (400, 40, 30, 6)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped by whoever adopted it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_second_process_ends_when_the_build_is_killed(faces: Path, tmp_path: Path) -> None:
    """A build killed with SIGKILL runs no clean-up; its second process must still end, or a
    re-run of the command would train age-random twice at once into the same folder."""
    script = (
        "import sys, torch\n"
        "from dataclasses import replace\n"
        "from pathlib import Path\n"
        "from fahr_research.models import ModelBuild, Recipe, smoke_recipe\n"
        "torch.set_num_threads(1)\n"
        "r = replace(smoke_recipe(Recipe()), age_epochs=100_000)\n"
        "b = ModelBuild(Path(sys.argv[1]), Path(sys.argv[2]), r, workers=1,"
        " echo=lambda s: print(s, flush=True), jobs=2)\n"
        "b.run(['shards', 'mae', 'age', 'age-random'])\n"
    )
    build = subprocess.Popen(
        [sys.executable, "-c", script, str(faces), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert build.stdout is not None
        for line in build.stdout:
            if m := re.match(r"\[age-random\] running in a second process \(pid (\d+)\)", line):
                child = int(m.group(1))
                break
        else:
            pytest.fail("the build never started its second process")
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "age-random" / "curve.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.5)  # until the second process is training
        assert _alive(child)
        build.kill()
        build.wait()
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _alive(child):
            os.kill(child, signal.SIGKILL)
            pytest.fail("the second process outlived the killed build")
    finally:
        build.kill()
