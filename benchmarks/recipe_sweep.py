"""What each recipe choice costs on the CPU: CPU-milliseconds per image of an MAE and a fine-tuning step.

The 2-core machine is shared, so wall-clock images/s mostly measure the neighbours; CPU time per
image (`time.process_time`, one torch thread) is the figure that sizes a run: divide the hours
available by it. Each arm times `--steps` optimiser steps at batch `--batch` on real faces (the
bundled demo sample), after `--warmup` untimed steps. The arms: the MAE decoder (width x depth)
for a vit_micro encoder, the fine-tuning (AgeViT) step at several input sizes, and the next
larger encoder (vit_tiny) for scale. (docs/age.md, "Recipe sweep")

    python benchmarks/recipe_sweep.py --out RUN/recipe_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fahr_core.age.model import AgeViT
from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.faces.images import load_faces, to_input
from fahr_core.io import atomic_write_json
from fahr_core.models.mae import MAE

MAE_ARMS = [("vit_micro", 64, 1), ("vit_micro", 128, 1), ("vit_micro", 128, 2), ("vit_micro", 256, 4)]
FT_ARMS = [("vit_micro", 112), ("vit_micro", 80), ("vit_micro", 64), ("vit_tiny", 112)]


def cpu_ms_per_image(step, batch: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t = time.process_time()
    for _ in range(steps):
        step()
    return 1000 * (time.process_time() - t) / (steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    faces = load_labelled_faces(demo_faces_dir())[: a.batch]
    crops = {112: load_faces([f.path for f in faces], 112)}
    rows = []
    for arch, dim, depth in MAE_ARMS:
        torch.manual_seed(0)
        mae = MAE(arch, 112, dim, depth, max(1, dim // 32))
        opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
        x = to_input(crops[112])

        def mae_step(mae: MAE = mae, opt: torch.optim.Optimizer = opt, x: torch.Tensor = x) -> None:
            loss, _, _ = mae(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = cpu_ms_per_image(mae_step, a.batch, a.warmup, a.steps)
        rows.append({"step": "MAE", "arch": arch, "img_size": 112, "decoder": f"{dim}x{depth}", "cpu_ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    for arch, size in FT_ARMS:
        if size not in crops:
            crops[size] = load_faces([f.path for f in faces], size)
        torch.manual_seed(0)
        model = AgeViT(arch, size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = to_input(crops[size]), torch.as_tensor(np.array([f.age for f in faces]), dtype=torch.float32)

        def ft_step(model: AgeViT = model, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            loss = (model(x) - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = cpu_ms_per_image(ft_step, a.batch, a.warmup, a.steps)
        rows.append({"step": "fine-tune", "arch": arch, "img_size": size, "decoder": "", "cpu_ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "rows": rows,
        "batch": a.batch,
        "steps": a.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
    }
    if a.out:
        atomic_write_json(a.out, result)
    print("\n| step | encoder | input | decoder | CPU-ms per image |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['arch']} | {r['img_size']} | {r['decoder']} | {r['cpu_ms']:.2f} |")


if __name__ == "__main__":
    main()
