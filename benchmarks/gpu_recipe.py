"""The GPU recipe: one script for one H200 in under 10 minutes; everything it writes goes to --out.

Three parts, each a section of `OUT/gpu_recipe.json` (and a table printed at the end):

1. MAE step throughput of fahr's own model (`fahr_core.models.mae.MAE`, ViT-B/16 at 112 px, 75%
   masked, decoder 8 x 512, norm-pix loss), batch `--mae-batch`, input read from shards: a plain
   PyTorch reference (eager, float32 weights under bf16 autocast, AdamW) and fahr's recipe (the
   same under `torch.compile`, fused AdamW), in the same process, as images/s and MFU (model FLOPs
   counted by `torch.utils.flop_counter` on one step, over the H200's dense bf16 peak of 989 TFLOP/s).
2. Shard input throughput: `FaceStream` over the shards through a DataLoader with one worker per
   CPU core (16 on the device machine), images/s delivered as uint8 batches.
3. `fahr models build`'s stages 1-4 (split, shards, MAE pre-training, age fine-tuning) with a
   ViT-S/16 recipe on the labelled faces in `--data`: held-out (validation part) MAE overall and
   mean per decade, curves, the encoder and the age model, under OUT/build.

    python benchmarks/gpu_recipe.py --data ../shared/data/utkface --out $OUT
    python benchmarks/gpu_recipe.py --tiny --data SMALL_FACE_FOLDER --out /tmp/x   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fahr_core.faces.images import to_input
from fahr_core.io import atomic_write_json
from fahr_core.models.mae import MAE
from fahr_core.train.pretrain import FaceStream, mask_noise, param_groups
from fahr_core.train.shards import ShardReader
from fahr_research.models import MAE_ENCODER, ModelBuild, Recipe, smoke_recipe

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM datasheet, dense (no sparsity)

# The ViT-S/16 run (part 3): budgets sized for the device's 10 minutes (docs/models.md).
GPU_RECIPE = Recipe(
    arch="vit_small",
    decoder_dim=256,
    decoder_depth=4,
    decoder_heads=8,
    mae_batch=1024,
    mae_base_lr=1.5e-4 * 4,
    mae_warmup=300,
    mae_steps=3000,  # 3000 x 1024 = 3.1 M images: 200 epochs of 15,000 faces
    mae_workers=12,
    mae_compile=True,
    age_epochs=50,
    balanced_epochs=10,
    age_batch=256,
    age_lr=2e-3,
    balanced_lr=5e-4,
    layer_decay=0.75,
)
TINY_RECIPE = replace(smoke_recipe(GPU_RECIPE), arch="vit_micro", mae_workers=0, mae_compile=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mae_throughput(shards: Path, arch: str, batch: int, steps: int, device: torch.device) -> dict:
    """images/s and MFU of one MAE step, eager (reference) and compiled (recipe), same data and model."""
    from torch.utils.flop_counter import FlopCounterMode

    reader = ShardReader(shards)
    n = len(reader)
    # batches from the shards (with repetition if there are fewer faces than one batch), on the device
    data = [
        to_input(torch.from_numpy(reader.read(np.arange(i * batch, (i + 1) * batch) % n))).to(device)
        for i in range(2)
    ]
    cuda = device.type == "cuda"
    out: dict = {"arch": arch, "batch": batch, "steps_timed": steps}
    for mode in ("reference_eager", "recipe_compiled"):
        torch.manual_seed(0)
        mae = MAE(arch, 112).to(device)
        compiled = mode == "recipe_compiled"
        opt = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=compiled and cuda)
        fwd = torch.compile(mae) if compiled and cuda else mae
        noise = [mask_noise(0, k, batch, mae.num_patches).to(device) for k in range(2)]

        def step(k: int, mae: MAE = mae, fwd=fwd, opt=opt, noise=noise) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _, _ = fwd(data[k % 2], noise=noise[k % 2])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if not compiled:
            counter = FlopCounterMode(display=False)
            with counter:
                step(0)
            out["gflop_per_image"] = counter.get_total_flops() / batch / 1e9
        for k in range(3):  # warm-up (and compilation)
            step(k)
        _sync(device)
        t = time.perf_counter()
        for k in range(steps):
            step(k)
        _sync(device)
        ips = batch * steps / (time.perf_counter() - t)
        out[f"{mode}_images_per_s"] = round(ips, 1)
        out[f"{mode}_mfu"] = round(ips * out["gflop_per_image"] / (H200_BF16_DENSE_TFLOPS * 1e3), 4)
        del mae, opt, fwd
        if cuda:
            torch.cuda.empty_cache()
    out["speed_up"] = round(out["recipe_compiled_images_per_s"] / out["reference_eager_images_per_s"], 3)
    return out


def input_throughput(shards: Path, batch: int, batches: int, workers: int) -> dict:
    """uint8 batches per second out of a DataLoader over the shards, `workers` processes."""
    stream = FaceStream(ShardReader(shards), batch)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    next(loader)  # workers started, first shards mapped
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t
    return {"workers": workers, "batch": batch, "images_per_s": round(batch * batches / seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="labelled faces (labels.csv layout)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-recipe-out")))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: vit_micro, a few steps")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mae-batch", type=int, default=1024)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    recipe = TINY_RECIPE if a.tiny else GPU_RECIPE
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "tiny": a.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    build = ModelBuild(
        a.data, a.out / "build", recipe, workers=a.workers, echo=lambda s: print(s, flush=True)
    )
    build.out.mkdir(parents=True, exist_ok=True)
    result["shards"] = build.shards()
    shards = build.out / "shards" / "train"
    result["input"] = input_throughput(shards, 32 if a.tiny else 1024, 3 if a.tiny else 50, a.workers)
    print(json.dumps(result["input"]), flush=True)
    arch, batch, steps = ("vit_micro", 8, 2) if a.tiny else ("vit_base", a.mae_batch, 30)
    result["mae_step"] = mae_throughput(shards, arch, batch, steps, device)
    print(json.dumps(result["mae_step"]), flush=True)
    result["recipe"] = asdict(recipe)
    result["mae"] = build.mae()
    result["age"] = build.age("age", build.out / "mae" / MAE_ENCODER)
    atomic_write_json(a.out / "gpu_recipe.json", result)
    print("\n| figure | value |\n|---|---|")
    for section in ("input", "mae_step", "age"):
        for k, v in result[section].items():
            print(f"| {section}.{k} | {v} |")
    return result


if __name__ == "__main__":
    main()
