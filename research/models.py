"""Rebuild every shipped model from a folder of labelled faces: what `fahr models build` runs.

The chain FAHR-Face describes, at the scale one machine affords, one stage after another, each
skipped when its output is complete so that a killed build continues where it stopped:

1. faces: the fixed decade split (`fahr_core.age.split`) of the labelled faces, every face through
   fahr's aligner (cached by content), `split.csv`;
2. shards: the aligned **training** faces as `fahr shards build` shards (the validation faces are
   never seen, not even unlabelled);
3. mae: MAE pre-training (`fahr pretrain`'s trainer, resumed from its checkpoint) and export of the
   encoder (`fahr export-encoder`);
4. age: `fahr age train --init` that encoder (its trainer), scored on the validation part;
5. warm start: where the survival model should start, by the held-out C of the demo's federation
   (epsilon 8) over sites simulated from the validation faces (`fahr_client.simulation`): the MAE
   encoder or the age model's encoder, each with a zero risk head (`[model].encoder_checkpoint`),
   or the whole age model with its head folded into the risk head (`[model].init_age_model`,
   fahr_core.models.initial); the best is written to `choice.toml`, a server config's `[model]`
   table that starts from it (with an encoder, `survival_encoder`);
6. age-random: the same age recipe from random initialisation, the comparison that shows what
   pre-training is worth. It ships nothing, so the default build (`DEFAULT_STAGES`) leaves it to
   its own command: beside it the age model had one core instead of two, and the shipped models
   took about 140 minutes on 2 cores instead of 85 (docs/models.md).

The bundled demo faces are left out of all training, so the demo's patients stay unseen. The
shipped age model is the recipe's final model (the mean of its two stages' last weights; no epoch
is picked on validation), so its validation numbers are an honest held-out estimate.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fahr_client.simulation import FederationSetup, federate
from fahr_core.age.evaluate import write_evaluation
from fahr_core.age.model import load_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.train import CURVE_FILE, FINAL_MODEL, AgeTrainConfig
from fahr_core.age.workflow import LabelledFaces, train_on_faces
from fahr_core.cohort import demo_faces_dir
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import ModelConfig, model_table
from fahr_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from fahr_core.models import shipped
from fahr_core.models.checkpoint import save_weights
from fahr_core.models.device import compute_device
from fahr_core.train.pretrain import CHECKPOINT, PretrainConfig, export_encoder, load_checkpoint, pretrain
from fahr_core.train.shards import build_shards

log = logging.getLogger(__name__)

DONE = "done.json"
MAE_ENCODER = "mae_encoder.safetensors"
AGE_ENCODER = "age_encoder.safetensors"
SURVIVAL_ENCODER = "survival_encoder.safetensors"
SUMMARY = "build.json"  # not a site report's summary.json: another file
STAGES = ("shards", "mae", "age", "warm-start", "age-random")  # in order; each needs those before it
DEFAULT_STAGES = STAGES[:-1]  # what the shipped models need; age-random is the comparison
# where the survival model can start (ModelBuild.warm_start_spec): an encoder with a zero risk head,
# or the age model with its head folded into the risk head
WARM_STARTS = ("mae", "age", "age-head")
CHOICE = "choice.toml"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the shipped models; the defaults are the measured recipe (docs/age.md)."""

    arch: str = shipped.ARCH
    img_size: int = 112
    # MAE pre-training
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    mae_batch: int = 128
    mae_base_lr: float = 4e-3
    mae_warmup: int = 300
    mae_steps: int = 9600
    mae_workers: int = 0  # shards are memory-mapped: on a CPU a worker process costs more than reading
    mae_compile: bool = False  # torch.compile: pays off on a GPU, not for a vit_micro on a CPU
    mae_checkpoint_every: int = 200  # steps (and always the last); resumable within minutes on the CPU
    # age fine-tuning (the same for both initialisations)
    age_epochs: int = 60
    balanced_epochs: int = 4
    age_batch: int = 64
    age_lr: float = 1e-3
    balanced_lr: float = 2.5e-4
    age_cap: float = 3.0  # largest oversampling factor of a decade in the balanced stage (docs/age.md)
    balanced_weight: float = 0.5  # the final model: this share of the balanced end, the rest general
    layer_decay: float = 0.75
    age_shift: int = 6
    # survival warm start: the demo's federation over sites drawn from the validation faces
    site_sizes: tuple[int, ...] = (150, 120, 90)
    site_mean_ages: tuple[float, ...] = (42.0, 55.0, 68.0)
    site_rates: tuple[float, ...] = (0.02, 0.03, 0.015)
    warm_start_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    shard_size: int = 2000
    seed: int = 0

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(
            arch=self.arch,
            img_size=self.img_size,
            decoder_dim=self.decoder_dim,
            decoder_depth=self.decoder_depth,
            decoder_heads=self.decoder_heads,
            batch_size=self.mae_batch,
            base_lr=self.mae_base_lr,
            warmup_steps=self.mae_warmup,
            total_steps=self.mae_steps,
            checkpoint_every=max(1, min(self.mae_checkpoint_every, self.mae_steps)),
            log_every=max(1, min(50, self.mae_steps)),
            num_workers=self.mae_workers,
            compile=self.mae_compile,
            seed=self.seed,
        )

    def age_config(self) -> AgeTrainConfig:
        return AgeTrainConfig(
            arch=self.arch,
            img_size=self.img_size,
            epochs=self.age_epochs,
            balanced_epochs=self.balanced_epochs,
            batch_size=self.age_batch,
            lr=self.age_lr,
            balanced_lr=self.balanced_lr,
            cap=self.age_cap,
            balanced_weight=self.balanced_weight,
            layer_decay=self.layer_decay,
            shift=self.age_shift,
            seed=self.seed,
        )


def demo_face_names() -> frozenset[str]:
    """File names of the bundled demo faces: never trained on, so the demo's patients stay unseen."""
    return frozenset(p.name for p in (demo_faces_dir() / "images").iterdir())


def _done(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / DONE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _finish(stage_dir: Path, result: dict[str, Any], started: float) -> dict[str, Any]:
    """Mark a stage complete; `pid` says which process of a `jobs` build ran it."""
    result = {**result, "seconds": round(time.perf_counter() - started, 1), "pid": os.getpid()}
    atomic_write_json(stage_dir / DONE, result)
    return result


def age_curve_png(curve_csv: Path) -> bytes:
    """Training L1 and validation MAE (overall and mean per decade) per epoch of both stages."""
    import csv

    from matplotlib.figure import Figure

    from fahr_core.report.figures import figure_png

    with curve_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    x = np.arange(1, len(rows) + 1)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key, label in (
        ("train_l1", "train L1"),
        ("val_mae", "validation MAE"),
        ("val_mean_decade_mae", "validation mean per-decade MAE"),
    ):
        ax.plot(x, [float(r[key] or "nan") for r in rows], "o-", ms=3, lw=1, label=label)
    general = sum(r["stage"] == "general" for r in rows)
    if general < len(rows):
        ax.axvline(general + 0.5, color="grey", lw=0.8, ls="--")
    averaged = " (last point: the mean of both stages' ends)" if rows[-1]["stage"] == "average" else ""
    ax.set_xlabel(f"epoch (general, then age-balanced after the dashed line){averaged}")
    ax.set_ylabel("years")
    ax.legend(fontsize=8)
    return figure_png(fig)


class ModelBuild:
    """One build folder: each stage's outputs under `out/<stage>/`, its `done.json` when complete."""

    def __init__(
        self,
        data: Path,
        out: Path,
        recipe: Recipe,
        aligned: Path | None = None,
        workers: int | None = None,
        exclude: frozenset[str] | None = None,
        echo: Callable[[str], object] = print,
        jobs: int = 1,
    ) -> None:
        if jobs not in (1, 2):
            raise ValueError(f"jobs must be 1 or 2, got {jobs}")
        self.data, self.out, self.recipe = Path(data), Path(out), recipe
        self.jobs = jobs
        self.aligned = Path(aligned) if aligned else self.out / "aligned"
        self.workers = workers
        self.exclude = demo_face_names() if exclude is None else exclude
        self.echo = echo
        self._faces: LabelledFaces | None = None

    def faces(self) -> LabelledFaces:
        """The split and aligned faces (alignment is cached, so a resumed build only re-hashes)."""
        if self._faces is None:
            self.echo(f"[faces] splitting and aligning {self.data} (cache {self.aligned})")
            self._faces = LabelledFaces(self.data, "auto", self.aligned, self.recipe.img_size, self.workers)
            self._faces.write_split(self.out / "split.csv")
        return self._faces

    def part(self, name: str) -> tuple[list, np.ndarray]:
        """Aligned faces of a part; the training part without the excluded (demo) faces."""
        records, images, _ = self.faces().part(name)  # type: ignore[arg-type]
        if name == "train":
            keep = [i for i, f in enumerate(records) if f.path.name not in self.exclude]
            records, images = [records[i] for i in keep], images[keep]
        return records, images

    def run(self, only: Sequence[str] = DEFAULT_STAGES) -> dict[str, Any]:
        """Run the stages in `only` that are not yet complete, in order. A run of every default
        stage ends by writing `build.json` (every complete stage, this run's recipe).

        With `jobs=2` the build keeps both cores of a 2-core machine busy: MAE pre-training as two
        processes, the warm start's arms split between two, and an age stage either on `jobs`
        times the torch threads or, when both age stages are still to run, one core each: age
        here, age-random (it needs only the faces) in a second process on the same build folder.
        """
        unknown = sorted(set(only) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        self.out.mkdir(parents=True, exist_ok=True)
        whole = set(DEFAULT_STAGES) <= set(only)
        if whole:
            (self.out / SUMMARY).unlink(missing_ok=True)  # present only after a complete run
        atomic_write_json(self.out / "recipe.json", asdict(self.recipe))
        chain = [name for name in STAGES if name in only]
        todo = {name for name in chain if _done(self.out / name) is None}
        beside: tuple[str, ...] = ()
        if self.jobs > 1 and {"age", "age-random"} <= todo:
            beside = ("age-random",)
            chain.remove("age-random")
        # an age stage is one process: with none beside it, it takes every core
        age_threads = torch.get_num_threads() * (1 if beside else self.jobs)
        age_threads = min(age_threads, os.cpu_count() or 1)
        # shards, then MAE (itself on `jobs` processes); age-random starts beside what follows
        first = [name for name in chain if name in ("shards", "mae")]
        results = {name: self.stage(name, age_threads) for name in first}
        if beside:
            self.faces()  # aligned here, with every alignment worker, before the second process reads them
        with self._beside("[age-random]", stages=beside):
            results |= {name: self.stage(name, age_threads) for name in chain if name not in first}
        results |= {name: self.stage(name, age_threads) for name in beside}  # done: read back
        if not whole:
            return {"stages": results}
        complete = {name: done for name in STAGES if (done := _done(self.out / name)) is not None}
        summary = {"data": str(self.data), "recipe": asdict(self.recipe), "stages": complete}
        atomic_write_json(self.out / SUMMARY, summary)
        self.echo(f"[build] done: {self.out / SUMMARY}")
        return summary

    def stage(self, name: str, age_threads: int) -> dict[str, Any]:
        """Run stage `name` unless it is complete; an age stage on `age_threads` torch threads."""
        if name == "age":
            return self.age(name, self.out / "mae" / MAE_ENCODER, age_threads)
        if name == "age-random":
            return self.age(name, None, age_threads)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "shards": self.shards,
            "mae": self.mae,
            "warm-start": self.warm_start,
        }
        return steps[name]()

    @contextmanager
    def _beside(
        self, what: str, stages: Sequence[str] = (), arms: Sequence[tuple[str, int]] = ()
    ) -> Iterator[None]:
        """Run `stages` and then warm-start `arms` in a second (spawned) process while the block
        runs here; wait for it at the end, stop it if the block fails, and fail if it failed.
        Nothing to do: no process. Its results land in the build folder, as a resumed build's do."""
        if not stages and not arms:
            yield
            return
        args = (
            self.data,
            self.out,
            self.recipe,
            self.aligned,
            self.workers,
            self.exclude,
            torch.get_num_threads(),
        )
        child = multiprocessing.get_context("spawn").Process(
            target=_second_process, args=(*args, tuple(stages), tuple(arms)), name=f"fahr-build {what}"
        )
        child.start()
        self.echo(f"{what} running in a second process (pid {child.pid})")
        try:
            yield
        except BaseException:
            child.terminate()
            child.join()
            raise
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(
                f"{what} failed in the second process (exit code {child.exitcode}); re-run to resume"
            )

    def shard_sources(self) -> list[tuple[str, Path]]:
        """(name, aligned crop file) of every training face: what the shards hold."""
        records, _ = self.part("train")
        table = self.faces().table
        crop = {str(r.path): table.crop_path(r) for r in table.aligned}
        return [(f.path.name, crop[str(f.path)]) for f in records]

    def shards(self) -> dict[str, Any]:
        stage = self.out / "shards"
        if (done := _done(stage)) is not None:
            self.echo("[shards] complete, skipped")
            return done
        started = time.perf_counter()
        sources = self.shard_sources()
        self.echo(f"[shards] {len(sources)} aligned training faces ({len(self.exclude)} demo names excluded)")
        # a shard's bytes do not depend on which process decodes it: all the alignment's workers
        workers = self.workers or os.cpu_count() or 1
        build_shards(sources, stage / "train", self.recipe.img_size, self.recipe.shard_size, (), workers)
        return _finish(stage, {"train_faces": len(sources)}, started)

    def mae(self) -> dict[str, Any]:
        stage = self.out / "mae"
        if (done := _done(stage)) is not None:
            self.echo("[mae] complete, skipped")
            return done
        started = time.perf_counter()
        cfg = self.recipe.pretrain_config()
        shards = self.out / "shards" / "train"
        gpus = torch.cuda.device_count()  # the trainer puts rank r on GPU r: a rank per core or per GPU
        if self.jobs > 1 and (gpus == 0 or gpus >= self.jobs):
            summary = self._pretrain_ranks(cfg, shards, stage)
        else:
            summary = pretrain(cfg, shards, stage, resume=True, echo=lambda s: self.echo(f"[mae] {s}"))
        export_encoder(stage / CHECKPOINT, stage / MAE_ENCODER)
        result = {"steps": summary["steps"], "final_loss": summary["final_loss"], "encoder": MAE_ENCODER}
        self.echo(f"[mae] {summary['steps']} steps, loss {summary['final_loss']:.4f}: {stage / MAE_ENCODER}")
        return _finish(stage, result, started)

    def _pretrain_ranks(self, cfg: PretrainConfig, shards: Path, stage: Path) -> dict[str, Any]:
        """MAE pre-training as `jobs` torch.distributed processes (gloo), one per core, each with
        its share of the recipe's batch. The trainer makes N processes train like one with the same
        global batch (same images, masks and learning rate per step; fahr_core.train.pretrain), so
        this is the one-process stage in about half the time, and either resumes the other's
        checkpoint.
        """
        if cfg.batch_size % self.jobs:
            raise ValueError(f"mae_batch {cfg.batch_size} does not split into {self.jobs} processes")
        per_rank = replace(cfg, batch_size=cfg.batch_size // self.jobs)
        with socket.socket() as s:  # a free port for the ranks to meet on (torchrun's way)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        ranks = [
            ctx.Process(
                target=_pretrain_rank,
                args=(per_rank, shards, stage, rank, self.jobs, port, torch.get_num_threads()),
                name=f"fahr-build [mae] rank {rank}",
            )
            for rank in range(self.jobs)
        ]
        for p in ranks:
            p.start()
        self.echo(f"[mae] {self.jobs} processes (pids {', '.join(str(p.pid) for p in ranks)})")
        try:
            _wait_for_all_or_a_failure(ranks)
        finally:
            for p in ranks:
                if p.is_alive():
                    p.terminate()
                p.join()
        failed = [f"rank {i} (exit code {p.exitcode})" for i, p in enumerate(ranks) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"[mae] failed in {', '.join(failed)}; re-run to resume")
        state = load_checkpoint(stage / CHECKPOINT)  # rank 0 saves it at the last step
        return {"steps": state["step"], "final_loss": state["history"][-1]["loss"]}

    def age(self, name: str, init: Path | None, threads: int) -> dict[str, Any]:
        stage = self.out / name
        if (done := _done(stage)) is not None:
            self.echo(f"[{name}] complete, skipped")
            return done
        with _torch_threads(threads):
            return self._age(stage, name, init)

    def _age(self, stage: Path, name: str, init: Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        train, x_train = self.part("train")
        val, x_val = self.part("validation")
        self.echo(f"[{name}] {len(train)} training, {len(val)} validation faces; init {init or 'random'}")
        run = train_on_faces(
            self.recipe.age_config(),
            self.data,
            (train, x_train),
            (val, x_val),
            stage,
            init,
            lambda s: self.echo(f"[{name}] {s}"),
        )
        atomic_write_bytes(stage / "curve.png", age_curve_png(stage / CURVE_FILE))
        model = load_age_model(stage / FINAL_MODEL).to(compute_device())  # ten views of every face
        extra = {"model": str(stage / FINAL_MODEL), "data": str(self.data), "part": "validation"}
        metrics = write_evaluation(stage / "validation", val, predict_ages(model, x_val), extra)
        self.echo(
            f"[{name}] final model on validation: MAE {metrics['mae']:.2f} y, "
            f"mean per-decade MAE {metrics['mean_decade_mae']:.2f} y"
        )
        result = {
            "model": FINAL_MODEL,
            "init": "mae" if init else "random",
            "val_mae": metrics["mae"],
            "val_mean_decade_mae": metrics["mean_decade_mae"],
            "train_seconds": run["seconds"],
            "threads": torch.get_num_threads(),
        }
        return _finish(stage, result, started)

    def _arm_file(self, name: str, seed: int) -> Path:
        return self.out / "warm-start" / f"arm-{seed}-{name}.json"

    def warm_start_arm(self, name: str, seed: int) -> dict[str, Any]:
        """One arm of the warm-start comparison: the demo's federation from start `name` (one of
        WARM_STARTS) over the sites of `seed`. Cached in `warm-start/arm-<seed>-<name>.json`, so a
        killed stage resumes by arm and arms can run in separate processes; each arm simulates its
        own copy of the (deterministic) sites and keeps fresh site state (ledgers).
        """
        stage = self.out / "warm-start"
        cached = self._arm_file(name, seed)
        if cached.is_file():
            return json.loads(cached.read_text(encoding="utf-8"))
        val, _ = self.part("validation")
        faces = [f for f in val if f.path.name not in self.exclude]
        r = self.recipe
        params = SimulationParams(
            n_sites=len(r.site_sizes),
            site_sizes=r.site_sizes,
            site_mean_ages=r.site_mean_ages,
            site_baseline_rates=r.site_rates,
        )
        sites = simulate_sites(faces, stage / f"sites-{seed}-{name}", params, seed=seed, overwrite=True)
        work = stage / f"state-{seed}-{name}"
        shutil.rmtree(work, ignore_errors=True)  # fresh ledgers: a re-run starts the arm afresh
        spec = replace(self.warm_start_spec(name), finetune=shipped.FINETUNE)
        res = {
            "seed": seed,
            "pid": os.getpid(),
            **federate(sites, spec, FederationSetup(), work, lambda s: None, self.aligned),
        }
        atomic_write_json(cached, res)
        self.echo(
            f"[warm-start] seed {seed}, {name}: mean held-out C {res['mean_c']:.3f} "
            f"(oracle {res['mean_oracle_c']:.3f})"
        )
        return res

    def warm_start_spec(self, name: str) -> ModelConfig:
        """The `[model]` settings of warm start `name`, with this build's files."""
        r = self.recipe
        if name == "mae":
            return ModelConfig(
                arch=r.arch, img_size=r.img_size, encoder_checkpoint=str(self.out / "mae" / MAE_ENCODER)
            )
        age_model = self.out / "age" / FINAL_MODEL
        if name == "age-head":
            return ModelConfig(arch=r.arch, img_size=r.img_size, init_age_model=str(age_model))
        encoder = self.out / "warm-start" / AGE_ENCODER  # the age model's encoder, in the encoder format
        if not encoder.is_file():
            model = load_age_model(age_model)
            save_weights(encoder, model.encoder.state_dict(), {"format": "fahr-age-encoder"})
        return ModelConfig(arch=r.arch, img_size=r.img_size, encoder_checkpoint=str(encoder))

    def warm_start(self) -> dict[str, Any]:
        stage = self.out / "warm-start"
        if (done := _done(stage)) is not None:
            self.echo("[warm-start] complete, skipped")
            return done
        started = time.perf_counter()
        todo = [
            (k, seed)
            for k in WARM_STARTS
            for seed in self.recipe.warm_start_seeds
            if not self._arm_file(k, seed).is_file()
        ]
        there = todo[1::2] if self.jobs > 1 else []
        with self._beside("[warm-start]", arms=there):
            for k, seed in todo:
                if (k, seed) not in there:
                    self.warm_start_arm(k, seed)
        arms = {
            k: [self.warm_start_arm(k, seed) for seed in self.recipe.warm_start_seeds] for k in WARM_STARTS
        }
        mean = {k: float(np.mean([a["mean_c"] for a in v])) for k, v in arms.items()}
        chosen = max(mean, key=lambda k: mean[k])
        config = self.write_choice(chosen, f"mean held-out C {mean[chosen]:.3f}")
        oracle = float(np.mean([a["mean_oracle_c"] for a in arms[chosen]]))
        self.echo(
            f"[warm-start] chosen: {chosen} (held-out C {mean[chosen]:.3f}, oracle {oracle:.3f}); "
            f"server [model]: {config}"
        )
        result = {
            "chosen": chosen,
            "model_config": config,
            "mean_c": mean,
            "mean_oracle_c": oracle,
            "arms": arms,
        }
        return _finish(stage, result, started)

    def write_choice(self, chosen: str, why: str) -> str:
        """Write `warm-start/choice.toml`, a server's `[model]` table that starts from `chosen` (paths
        relative to the file, as a server config's are, so the table loads as it is), copying an
        encoder start to `survival_encoder`; returns the line that names the start."""
        stage = self.out / "warm-start"
        spec = self.warm_start_spec(chosen)
        key = "encoder_checkpoint" if spec.encoder_checkpoint else "init_age_model"
        if spec.encoder_checkpoint:
            shutil.copyfile(spec.encoder_checkpoint, stage / SURVIVAL_ENCODER)
            path = SURVIVAL_ENCODER
        else:
            path = f"../age/{FINAL_MODEL}"
        start = replace(spec, finetune=shipped.FINETUNE, **{key: path})
        head = f"# fahr models build's warm start: {chosen}, {why}"
        atomic_write_text(stage / CHOICE, f"{head}\n{model_table(start)}")
        return f'{key} = "{path}"'


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads, then give back the number it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _wait_for_all_or_a_failure(procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Return when every process has ended, or as soon as one has failed (its peers would wait for
    it in a collective until gloo's timeout). One snapshot of the exit codes per pass: a process
    that dies after it keeps its sentinel in the wait, which is then ready at once; reading the
    codes twice could miss a death between the reads and wait on the living alone."""
    while None in (codes := [p.exitcode for p in procs]) and set(codes) <= {None, 0}:
        running = [p.sentinel for p, code in zip(procs, codes, strict=True) if code is None]
        multiprocessing.connection.wait(running)


def _end_with_parent() -> None:
    """End this (spawned) process when the build that started it is gone (killed with a signal
    that runs no clean-up): otherwise a re-run of the command would train the same stage twice."""
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True, name="parent-watch").start()


def _pretrain_rank(
    cfg: PretrainConfig, shards: Path, stage: Path, rank: int, world: int, port: int, threads: int
) -> None:
    """One process of `ModelBuild._pretrain_ranks` (rank 0 logs and checkpoints)."""
    _end_with_parent()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    echo = (lambda s: print(f"[mae] {s}", flush=True)) if rank == 0 else (lambda s: None)
    pretrain(cfg, shards, stage, resume=True, echo=echo)


def _second_process(
    data: Path,
    out: Path,
    recipe: Recipe,
    aligned: Path,
    workers: int | None,
    exclude: frozenset[str],
    threads: int,
    stages: tuple[str, ...],
    arms: tuple[tuple[str, int], ...],
) -> None:
    """`ModelBuild._beside`'s process: the same build folder, its own torch threads and log lines."""
    _end_with_parent()
    torch.set_num_threads(threads)
    build = ModelBuild(data, out, recipe, aligned, workers, exclude, echo=lambda s: print(s, flush=True))
    for name in stages:
        build.stage(name, threads)
    for name, seed in arms:
        build.warm_start_arm(name, seed)


def smoke_recipe(recipe: Recipe) -> Recipe:
    """`recipe` cut to the fewest, smallest steps that still run every stage: for tests and CPU smoke runs."""
    return replace(
        recipe,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        mae_batch=16,
        mae_warmup=2,
        mae_steps=4,
        age_epochs=1,
        balanced_epochs=1,
        age_batch=16,
        shard_size=50,
    )


def recipe_from_json(path: Path | None) -> Recipe:
    """The default recipe with the fields a JSON file sets; an unknown field is an error naming it."""
    if path is None:
        return Recipe()
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    known = set(Recipe.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown recipe field(s) {', '.join(unknown)}")
    tuples = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}
    return Recipe(**{**fields, **tuples})
