"""The short sweep that picked `fahr models build`'s recipe (docs/age.md, "Recipe sweep").

Every arm is measured on the **training** part of the fixed split only: that part (without the
demo faces) is split again, seeded, into sweep-train and sweep-check faces, so the validation
part the shipped numbers are reported on takes no part in choosing the recipe. Per MAE arm:
`--mae-steps` steps of `fahr pretrain`'s trainer on shards of the sweep-train faces (images/s and
the final loss), then one age fine-tuning epoch (`fahr age train`'s trainer, general stage) on
`--ft-faces` sweep-train faces from that encoder, scored on the sweep-check faces. Fine-tuning
arms vary the learning rate and the layer decay from the first MAE arm's encoder.

    python benchmarks/recipe_sweep.py --data ../shared/data/utkface --out RUN --aligned CACHE
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fahr_core.age.evaluate import age_metrics
from fahr_core.age.model import load_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.age.train import FINAL_MODEL, train_age_model
from fahr_core.io import atomic_write_json
from fahr_core.train.model_build import ModelBuild, Recipe
from fahr_core.train.pretrain import CHECKPOINT, export_encoder, pretrain
from fahr_core.train.shards import build_shards

MAE_ARMS = {  # name: Recipe fields that differ from the first arm
    "micro dec128x2 lr4e-3": {},
    "micro dec64x1 lr4e-3": {"decoder_dim": 64, "decoder_depth": 1},
    "micro dec128x4 lr4e-3": {"decoder_depth": 4},
    "micro dec128x2 lr1e-2": {"mae_base_lr": 1e-2},
}
FT_ARMS = {  # fine-tuning variants from the first MAE arm's encoder
    "lr 2e-3": {"age_lr": 2e-3},
    "layer decay 0.9": {"layer_decay": 0.9},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--aligned", type=Path, default=None)
    ap.add_argument("--mae-steps", type=int, default=150)
    ap.add_argument("--mae-batch", type=int, default=64)
    ap.add_argument("--ft-faces", type=int, default=4000)
    ap.add_argument("--check-faces", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = replace(
        Recipe(), mae_steps=a.mae_steps, mae_batch=a.mae_batch, mae_warmup=a.mae_steps // 5, age_epochs=1
    )
    base = replace(base, balanced_epochs=0)
    build = ModelBuild(a.data, a.out, base, a.aligned)
    records, images = build.part("train")
    order = np.random.default_rng(0).permutation(len(records))
    check, train = order[: a.check_faces], order[a.check_faces :]
    ft = train[: a.ft_faces]
    ages = np.array([f.age for f in records])
    table = build.faces().table
    crop = {str(r.path): table.crop_path(r) for r in table.aligned}
    shards = a.out / "sweep-shards"
    build_shards([(records[i].path.name, crop[str(records[i].path)]) for i in train], shards, 112, 2000)

    def finetune(recipe: Recipe, init: Path | None, tag: str) -> dict:
        run = a.out / f"ft-{tag}"
        started = time.perf_counter()
        train_age_model(recipe.age_config(), images[ft], ages[ft], images[check], ages[check], run, init)
        m = age_metrics(ages[check], predict_ages(load_age_model(run / FINAL_MODEL), images[check]))
        return {"check_mae": round(m["mae"], 2), "ft_seconds": round(time.perf_counter() - started, 1)}

    rows = []
    encoders = {}
    for name, fields in MAE_ARMS.items():
        recipe = replace(base, **fields)
        tag = name.replace(" ", "_")
        started = time.perf_counter()
        s = pretrain(recipe.pretrain_config(), shards, a.out / f"mae-{tag}", resume=True)
        seconds = time.perf_counter() - started
        enc = export_encoder(a.out / f"mae-{tag}" / CHECKPOINT, a.out / f"mae-{tag}.safetensors")
        encoders[name] = enc
        ips = float(np.median([h["images_per_s"] for h in s["history"]]))
        row = {"arm": name, "mae_loss": round(s["final_loss"], 4), "mae_images_per_s": round(ips, 1)}
        row |= {"mae_seconds": round(seconds, 1), **finetune(recipe, enc, tag)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = next(iter(MAE_ARMS))
    for name, fields in FT_ARMS.items():
        row = {
            "arm": f"{first}, fine-tune {name}",
            **finetune(replace(base, **fields), encoders[first], name),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append({"arm": "random init", **finetune(base, None, "random")})
    print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(
        a.out / "sweep.json",
        {
            "rows": rows,
            "sweep_train_faces": len(train),
            "ft_faces": len(ft),
            "check_faces": len(check),
            "mae_steps": a.mae_steps,
            "mae_batch": a.mae_batch,
            "threads": a.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        },
    )


if __name__ == "__main__":
    main()
