"""The model build's MAE stage on one process against two (`fahr models build --jobs 1 / 2`).

With `--jobs 2` the stage runs as two torch.distributed processes of one torch thread each, each
with half the recipe's batch (`ModelBuild._pretrain_ranks`); the trainer makes them train like one
process with the same global batch, so what changes is only the wall time. Both arms run here, in
the same run and on the same shards, through the build's own stage (spawning and the gloo set-up
included): the recipe's MAE configuration for `--steps` steps on the bundled demo faces (aligned
by fahr, none left out), one arm after the other.

    python benchmarks/mae_ranks.py --steps 200 --out RUN/mae_ranks.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fahr_core.cohort import demo_faces_dir
from fahr_core.io import atomic_write_json
from fahr_core.train.pretrain import CHECKPOINT, load_checkpoint
from fahr_research.models import DONE, ModelBuild, Recipe


def arm(out: Path, aligned: Path, recipe: Recipe, jobs: int) -> dict:
    """The build's shards + mae stages with `jobs` processes: wall time and steady images/s."""
    shutil.rmtree(out, ignore_errors=True)  # a stage done by an earlier run would be skipped, not timed
    build = ModelBuild(demo_faces_dir(), out, recipe, aligned, exclude=frozenset(), echo=print, jobs=jobs)
    build.run(["shards", "mae"])
    done = json.loads((out / "mae" / DONE).read_text(encoding="utf-8"))
    history = load_checkpoint(out / "mae" / CHECKPOINT)["history"]
    images = recipe.mae_steps * recipe.mae_batch
    return {
        "jobs": jobs,
        "stage_seconds": done["seconds"],
        "images_per_s": round(images / done["seconds"], 1),
        "median_step_images_per_s": round(statistics.median(h["images_per_s"] for h in history[10:]), 1),
        "final_loss": round(done["final_loss"], 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fahr-mae-ranks"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as `make models` (--threads 1): one thread in each process
    recipe = replace(Recipe(), mae_steps=a.steps, mae_warmup=max(1, a.steps // 10))
    aligned = a.work / "aligned"
    arms = [arm(a.work / f"jobs{j}", aligned, recipe, j) for j in (1, 2)]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".strip(),
        "date": datetime.date.today().isoformat(),
        "recipe": {k: getattr(recipe, k) for k in ("arch", "decoder_dim", "decoder_depth", "mae_batch")},
        "steps": a.steps,
        "arms": arms,
        "speed_up": round(arms[1]["images_per_s"] / arms[0]["images_per_s"], 2),
    }
    print(json.dumps(result, indent=1))
    if a.out:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
