"""The GPU recipe: one script for one H200 in under 10 minutes.

Four parts, each a section of `OUT/gpu_recipe.json` (and a table printed at the end):

1. MAE step throughput of fahr's own model (`fahr_core.models.mae.MAE`, ViT-B/16 at 112 px, 75%
   masked, decoder 8 x 512, norm-pix loss), batch `--mae-batch`, in the same process: a plain
   PyTorch reference (float32 weights under bf16 autocast, AdamW; eager, then `torch.compile`d,
   the issue's reference) on two batches already on the GPU, and fahr's recipe as `fahr pretrain`
   runs it (compiled, fused AdamW, batches read from the shards by a DataLoader into pinned memory),
   as images/s and MFU (model FLOPs counted by `torch.utils.flop_counter` on one step, over the
   H200's dense bf16 peak of 989 TFLOP/s).
2. Shard input throughput: `FaceStream` over the shards through a DataLoader with one worker per
   CPU core (16 on the device machine), images/s delivered as uint8 batches, in all and per worker.
3. `fahr models build`'s stages 1-4 (split, shards, MAE pre-training, age fine-tuning) with a
   ViT-S/16 recipe on the labelled faces: held-out (validation part) MAE overall, per decade and
   their mean, the MAE and age curves, and the age model's weights (bfloat16, split into files of
   at most `--max-file-mib`; `cat` joins them).
4. Site training on the GPU: one DP-SGD round (`train_dp`, what `fahr-client` runs; epsilon 8,
   head and last block) of the survival model started from that age model, over a site made of
   half the validation faces with deaths drawn from their true ages (Gompertz), then the risk of
   the other half (`patient_risk`): where it ran, DP images/s, and held-out C against the true
   age's C.

`--out` (default `$OUT`, what the device machine sends back: at most 8 files of 16 MiB) gets only
those results; the build's own files (faces, shards, checkpoints) go to `--work`. The run has one
`--deadline`: every part's result is saved as it ends, a part that fails is recorded and the parts
that do not need it still run, and a part that would start too close to the deadline is skipped.

The device machine has no face detector and takes at most 64 MiB of files, so the faces travel
aligned: `--pack` writes the split's aligned faces (fahr's aligner, run here) as WebP into one tar,
which `--faces` reads instead of `--data`. The MAE and age stages get a time budget each
(`--mae-seconds`, `--age-seconds`, cut to what the deadline leaves): their steps and epochs are
sized from a short timing of the recipe's own model before they start, so the schedule (warm-up,
decay) still spans the whole run. `benchmarks/gpu_device.sh` is the command for the device machine.

    python benchmarks/gpu_recipe.py --data ../shared/data/utkface --pack .gpu/faces.tar   # here
    python benchmarks/gpu_recipe.py --faces .gpu/faces.tar                          # device, to $OUT
    python benchmarks/gpu_recipe.py --tiny --data SMALL_FACE_FOLDER --out /tmp/x   # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import tarfile
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fahr_core.age.evaluate import METRICS_FILE
from fahr_core.age.model import AgeViT
from fahr_core.age.train import FINAL_MODEL
from fahr_core.cohort.faces import FaceRecord
from fahr_core.config import ModelConfig, PrivacyConfig, TrainConfig
from fahr_core.faces.images import load_face, to_input
from fahr_core.io import atomic_write_bytes, atomic_write_json
from fahr_core.models import shipped
from fahr_core.models.checkpoint import load_weights
from fahr_core.models.finetune import prepare
from fahr_core.models.initial import initial_model
from fahr_core.models.mae import MAE
from fahr_core.privacy.ledger import PrivacyLedger
from fahr_core.survival.metrics import harrell_c
from fahr_core.train.local import SurvivalData, patient_risk, train_dp
from fahr_core.train.pretrain import FaceStream, mask_noise, param_groups
from fahr_core.train.shards import ShardReader
from fahr_research.models import MAE_ENCODER, ModelBuild, Recipe, smoke_recipe

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM datasheet, dense (no sparsity)
RESULT_FILE = "gpu_recipe.json"
# Seconds a part needs beyond its training budget, sized for an H200 (never measured there): a
# torch.compile of a ViT, and what follows the ViT-S stages (their compilation, the evaluation of
# ten views, the site's DP round and its ChaCha20 kernels' compilation).
COMPILE_S = 90.0
SITE_S = 45.0
RESERVE_S = 150.0
PACK_LIST = "faces.csv"  # in a pack: name, age, sex, part; the images are PART/NAME.webp
WEBP_QUALITY = 85  # 1.7 KB a face: the 18,000 shared faces fit the device's 64 MiB with the repo

# The ViT-S/16 run (part 3). Steps and epochs are the most the stages do; the time budgets size
# them down from a timing on the device (docs/models.md).
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
    mae_checkpoint_every=1000,  # a ViT-S checkpoint with its optimizer is 300 MB
    mae_compile=True,
    age_epochs=50,
    balanced_epochs=10,
    age_batch=256,
    age_lr=2e-3,
    balanced_lr=5e-4,
    age_cap=20.0,  # the paper's: the per-decade goal here (6.0 y) asks more of the old than the CPU one
    layer_decay=0.75,
)
TINY_RECIPE = replace(smoke_recipe(GPU_RECIPE), arch="vit_micro", mae_workers=0, mae_compile=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _images_per_s(step: Any, batch: int, steps: int, device: torch.device, warmup: int = 3) -> float:
    for k in range(warmup):  # warm-up (and compilation)
        step(k)
    _sync(device)
    t = time.perf_counter()
    for k in range(steps):
        step(k)
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def _compile(module: torch.nn.Module, device: torch.device) -> Any:
    """torch.compile with Inductor on a GPU; on a CPU (the --tiny run) AOTAutograd without code
    generation, so the test suite still traces the model forward and backward the way the GPU run
    will, without a C++ compiler's minutes."""
    return torch.compile(module, backend="inductor" if device.type == "cuda" else "aot_eager")


def _mae_step(mae: MAE, batches: Any, device: torch.device, mode: str) -> Any:
    """One MAE training step (bf16 autocast on a GPU) as a function of the step number k.

    `batches(k)` gives step k's (images in [-1, 1] on the device, mask noise). The reference is
    plain PyTorch (AdamW's default multi-tensor step), eager or compiled; the recipe is what
    `fahr pretrain` runs on a GPU (compiled, fused AdamW).
    """
    cuda = device.type == "cuda"
    fused = mode == "recipe" and cuda
    opt = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    fwd = mae if mode == "reference_eager" else _compile(mae, device)

    def step(k: int) -> None:
        x, noise = batches(k)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = fwd(x, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _shard_batches(shards: Path, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Two batches from the shards (repeating faces if there are fewer than a batch), on the device."""
    reader = ShardReader(shards)
    n = len(reader)
    return [
        to_input(torch.from_numpy(reader.read(np.arange(i * batch, (i + 1) * batch) % n))).to(device)
        for i in range(2)
    ]


def _resident(shards: Path, batch: int, num_patches: int, device: torch.device) -> Any:
    """The reference's input: two batches and their mask noise, already on the device."""
    data = _shard_batches(shards, batch, device)
    noise = [mask_noise(0, k, batch, num_patches).to(device) for k in range(len(data))]
    return lambda k: (data[k % len(data)], noise[k % len(data)])


def _streamed(shards: Path, batch: int, num_patches: int, device: torch.device, workers: int) -> Any:
    """The recipe's input, as `fahr pretrain` reads it: uint8 batches from the shards through a
    DataLoader (pinned memory on a GPU), copied without blocking, scaled on the device."""
    loader = DataLoader(
        FaceStream(ShardReader(shards), batch),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    it = iter(loader)

    def batches(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, faces = next(it)
        return to_input(faces.to(device, non_blocking=True)), mask_noise(0, k, batch, num_patches)

    return batches


MAE_MODES = ("reference_eager", "reference_compiled", "recipe")


def mae_throughput(
    shards: Path, arch: str, batch: int, steps: int, workers: int, device: torch.device, run: Parts
) -> dict:
    """images/s and MFU of one MAE step in each of MAE_MODES, the same model and faces.

    A mode that fails (a compiler error on new hardware, say) is recorded in the result and the
    others still run; a mode starts only with `COMPILE_S` left (its compilation), else is skipped.
    """
    from torch.utils.flop_counter import FlopCounterMode

    out: dict = {"arch": arch, "batch": batch, "steps_timed": steps}
    for mode in MAE_MODES:
        if run.left() < COMPILE_S:
            out[f"{mode}_skipped"] = f"{run.left():.0f} s left of the deadline"
            continue
        try:
            torch.manual_seed(0)
            mae = MAE(arch, 112).to(device)
            source = _streamed if mode == "recipe" else _resident
            extra = (workers,) if mode == "recipe" else ()
            step = _mae_step(mae, source(shards, batch, mae.num_patches, device, *extra), device, mode)
            if "gflop_per_image" not in out:
                counter = FlopCounterMode(display=False)
                with counter:
                    step(0)
                out["gflop_per_image"] = counter.get_total_flops() / batch / 1e9
            # the recipe's warm-up also takes the batches its loader queued during compilation
            warmup = 3 + (2 * workers if mode == "recipe" else 0)
            ips = _images_per_s(step, batch, steps, device, warmup)
        except Exception as e:  # noqa: BLE001 - one shot on the device: keep the other modes' figures
            traceback.print_exc()
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out[f"{mode}_images_per_s"] = round(ips, 1)
        out[f"{mode}_mfu"] = round(ips * out["gflop_per_image"] / (H200_BF16_DENSE_TFLOPS * 1e3), 4)
        run.result["mae_step"] = out  # saved as it grows: a later mode that hangs loses nothing
        run.save()
    if "recipe_images_per_s" in out and "reference_compiled_images_per_s" in out:
        out["speed_up"] = round(out["recipe_images_per_s"] / out["reference_compiled_images_per_s"], 3)
    return out


def input_throughput(shards: Path, batch: int, batches: int, workers: int, pin: bool) -> dict:
    """uint8 batches per second out of a DataLoader over the shards, `workers` processes.

    Timed after every worker has delivered twice (the queue the DataLoader fills ahead would
    otherwise be counted as free batches).
    """
    stream = FaceStream(ShardReader(shards), batch)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin))
    for _ in range(2 * max(1, workers)):
        next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    ips = batch * batches / (time.perf_counter() - t)
    return {
        "workers": workers,
        "batch": batch,
        "batches_timed": batches,
        "pinned": pin,
        "images_per_s": round(ips, 1),
        "images_per_s_per_worker": round(ips / max(1, workers), 1),
    }


def sized_recipe(
    recipe: Recipe,
    shards: Path,
    n_train: int,
    budgets: tuple[float, float],
    input_ips: float,
    device: torch.device,
) -> tuple[Recipe, dict]:
    """`recipe` with its MAE steps and age epochs cut to fit the (MAE, age) budgets in seconds.

    The rates are timed on the recipe's own models in eager mode (compiled runs only faster), the
    MAE rate capped at 80% of what the loader delivers; the recipe's values are the upper limits.
    """
    torch.manual_seed(0)
    mae = MAE(recipe.arch, recipe.img_size, recipe.decoder_dim, recipe.decoder_depth, recipe.decoder_heads)
    batches = _resident(shards, recipe.mae_batch, mae.num_patches, device)
    step = _mae_step(mae.to(device), batches, device, "reference_eager")
    mae_ips = min(_images_per_s(step, recipe.mae_batch, 5, device), 0.8 * input_ips)
    del mae, batches, step
    age = AgeViT(recipe.arch, recipe.img_size, 50.0, 20.0).to(device)
    opt = torch.optim.AdamW(age.parameters(), lr=1e-4)
    x = torch.randn(recipe.age_batch, 3, recipe.img_size, recipe.img_size, device=device)

    def age_step(k: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = age(x).float().abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    age_ips = _images_per_s(age_step, recipe.age_batch, 8, device)
    steps = min(recipe.mae_steps, max(20, int(budgets[0] * mae_ips / recipe.mae_batch)))
    epochs = min(
        recipe.age_epochs + recipe.balanced_epochs, max(2, int(0.7 * budgets[1] * age_ips / n_train))
    )
    balanced = max(1, round(epochs * recipe.balanced_epochs / (recipe.age_epochs + recipe.balanced_epochs)))
    sized = replace(
        recipe,
        mae_steps=steps,
        mae_warmup=min(recipe.mae_warmup, steps // 10),
        age_epochs=epochs - balanced,
        balanced_epochs=balanced,
    )
    timing = {
        "mae_eager_images_per_s": round(mae_ips, 1),
        "age_eager_images_per_s": round(age_ips, 1),
        "mae_steps": steps,
        "age_epochs": epochs - balanced,
        "balanced_epochs": balanced,
    }
    return sized, timing


def _encode(face: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(face.transpose(1, 2, 0))).save(buf, "WEBP", quality=WEBP_QUALITY)
    return buf.getvalue()


def pack(data: Path, aligned: Path | None, to: Path, workers: int | None) -> dict:
    """Write the split's aligned faces (training part without the demo faces, validation part) to `to`."""
    with tempfile.TemporaryDirectory() as tmp:
        build = ModelBuild(data, Path(tmp), Recipe(), aligned, workers)
        rows, buf = [], io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for part in ("train", "validation"):
                records, images = build.part(part)
                for f, face in zip(records, images, strict=True):
                    blob = _encode(face)
                    info = tarfile.TarInfo(f"{part}/{f.path.name}.webp")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                    rows.append([f.path.name, f"{f.age:g}", f.sex, part])
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows([["name", "age", "sex", "part"], *rows])
            listing = text.getvalue().encode()
            info = tarfile.TarInfo(PACK_LIST)
            info.size = len(listing)
            tar.addfile(info, io.BytesIO(listing))
    atomic_write_bytes(to, buf.getvalue())
    return {"faces": len(rows), "bytes": to.stat().st_size}


class PackedBuild(ModelBuild):
    """`fahr models build`'s stages over a pack of aligned faces (no aligner on the device machine)."""

    def __init__(self, packed: Path, out: Path, recipe: Recipe, workers: int, echo: Any) -> None:
        super().__init__(packed, out, recipe, workers=workers, exclude=frozenset(), echo=echo)
        folder = self.out / "packed"
        with tarfile.open(packed) as tar:
            tar.extractall(folder, filter="data")
        with (folder / PACK_LIST).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.files: dict[str, list[Path]] = {}
        self.parts: dict[str, tuple[list, np.ndarray]] = {}
        for part in ("train", "validation"):
            mine = [r for r in rows if r["part"] == part]
            files = [folder / part / f"{r['name']}.webp" for r in mine]
            with ProcessPoolExecutor(max(1, workers)) as ex:
                images = np.stack(
                    list(ex.map(load_face, files, [recipe.img_size] * len(files), chunksize=256))
                )
            records = [FaceRecord(Path(r["name"]), float(r["age"]), r["sex"]) for r in mine]
            self.files[part], self.parts[part] = files, (records, images)

    def part(self, name: str) -> tuple[list, np.ndarray]:
        return self.parts[name]

    def shard_sources(self) -> list[tuple[str, Path]]:
        return [(p.name, p) for p in self.files["train"]]


def _site(images: np.ndarray, ages: np.ndarray, horizon: float, rng: np.random.Generator) -> SurvivalData:
    """One photo per patient; death times from a Gompertz law in the true age (doubling every 8
    years, 2% a year at 60), censored at `horizon` (the simulator's law, without its sex term)."""
    rate = 0.02 * np.exp(np.log(2) / 8 * (ages - 60.0))
    death = rng.exponential(1.0 / rate)
    return SurvivalData(
        images=images,
        photos=tuple((i,) for i in range(len(images))),
        time=np.minimum(death, horizon),
        event=(death <= horizon).astype(int),
    )


def site_training(age_model: Path, images: np.ndarray, ages: np.ndarray, workdir: Path, arch: str) -> dict:
    """Part 4: one DP-SGD round of a site on the compute device, and its held-out risk scores."""
    spec = ModelConfig(
        arch=arch, img_size=images.shape[-1], init_age_model=str(age_model), finetune=shipped.FINETUNE
    )
    model = prepare(initial_model(spec), spec)
    rng = np.random.default_rng(0)  # the cohort's outcomes (not DP randomness: that stays secure)
    half = len(images) // 2
    train = _site(images[:half], ages[:half], spec.horizon_years, rng)
    test = _site(images[half:], ages[half:], spec.horizon_years, rng)
    c_start = harrell_c(test.time, test.event, patient_risk(model, test))
    ledger = PrivacyLedger.open(workdir / "ledger.json", 8.0, n_train=len(train))
    stats = train_dp(
        model,
        train,
        TrainConfig(local_epochs=3, batch_size=64, lr=2e-3),
        PrivacyConfig(epsilon=8.0, max_grad_norm=1.0),
        ledger,
        rounds_left=1,
        horizon=spec.horizon_years,
        round_info={"gpu_recipe": True},
    )
    return {
        "device": stats.device,
        "patients": [len(train), len(test)],
        "held_out_events": int(test.event.sum()),
        "dp_steps": stats.steps,
        "dp_images_per_s": round(stats.images / stats.seconds, 1),
        "epsilon": round(stats.epsilon, 3),
        "c_start": round(c_start, 4),
        "c_trained": round(harrell_c(test.time, test.event, patient_risk(model, test)), 4),
        "c_true_age": round(harrell_c(test.time, test.event, ages[half:]), 4),
    }


class Parts:
    """The run's result, saved to OUT/gpu_recipe.json after every part.

    The device machine gives one shot of 10 minutes: a part that fails is recorded (and its
    traceback printed) and the parts that do not need it still run; a part that would start too
    close to the deadline is skipped and recorded as such, so the run ends with its JSON written.
    """

    def __init__(self, out: Path, deadline: float, result: dict) -> None:
        self.path, self.deadline, self.result = out / RESULT_FILE, deadline, result
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        atomic_write_json(self.path, self.result)

    def run(self, name: str, part: Any, needs: float = 0.0) -> Any:
        """`part()`'s value, stored under `name`; None if it failed or was skipped."""
        value = None
        if self.left() < needs:
            self.result.setdefault("skipped", {})[name] = f"{self.left():.0f} s left, needs about {needs:.0f}"
        else:
            try:
                value = part()
                text = json.dumps(value)
            except Exception as e:  # noqa: BLE001 - recorded; the parts that do not need it go on
                traceback.print_exc()
                self.result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                value = None
            else:
                self.result[name] = value
                print(f"[{name}] {text}", flush=True)
        self.save()
        return value


def export_weights(model: Path, out: Path, name: str, max_bytes: int) -> dict:
    """`model` in bfloat16 under `out`, split into files of at most `max_bytes` where it is larger
    (what comes back from the device machine is limited per file); `cat` joins the parts in
    order into a fahr weights file with the original's metadata, checked by the sha256 given."""
    from safetensors import safe_open
    from safetensors.torch import save

    state = load_weights(model)
    with safe_open(str(model), framework="pt") as f:
        metadata = f.metadata() or {}
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    blob = save(half, metadata={**metadata, "dtype": "bfloat16"})
    chunks = [blob[i : i + max_bytes] for i in range(0, len(blob), max_bytes)]
    names = [name] if len(chunks) == 1 else [f"{name}.part{i:02d}" for i in range(len(chunks))]
    for part, chunk in zip(names, chunks, strict=True):
        atomic_write_bytes(out / part, chunk)
    return {"file": name, "parts": names, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def _vit_s_budgets(run: Parts, mae_seconds: float, age_seconds: float) -> tuple[float, float]:
    """The ViT-S stages' budgets: the flags', cut (in their ratio) to what the deadline leaves
    after the stages' compilation, the evaluation and the site part."""
    room = run.left() - RESERVE_S
    scale = max(0.0, min(1.0, room / (mae_seconds + age_seconds)))
    return mae_seconds * scale, age_seconds * scale


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="labelled faces (labels.csv layout), aligned by fahr")
    ap.add_argument("--faces", type=Path, help="a pack written by --pack, instead of --data")
    ap.add_argument("--pack", type=Path, help="write the aligned faces of --data to this tar and stop")
    ap.add_argument("--aligned", type=Path, help="alignment cache for --data (default WORK/build/aligned)")
    ap.add_argument(
        "--out",
        type=Path,
        default=os.environ.get("OUT"),
        help="what the run keeps: its JSON, curves and the age model's weights (default $OUT)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fahr-gpu-recipe",
        help="the build's own files: faces, shards, checkpoints (hundreds of MB; not kept)",
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: vit_micro, a few steps")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mae-batch", type=int, default=1024)
    ap.add_argument("--mae-seconds", type=float, default=150.0, help="time budget of the ViT-S MAE stage")
    ap.add_argument("--age-seconds", type=float, default=100.0, help="time budget of the ViT-S age stage")
    ap.add_argument(
        "--deadline", type=float, default=540.0, help="seconds for the whole run: later parts are cut to fit"
    )
    ap.add_argument("--max-file-mib", type=float, default=15.0, help="largest weights file written to --out")
    a = ap.parse_args(argv)
    if (a.data is None) == (a.faces is None):
        ap.error("give exactly one of --data and --faces")
    if a.out is None and not a.pack:
        ap.error("give --out (the device machine sets $OUT)")
    if a.pack:
        if a.data is None:
            ap.error("--pack needs --data")
        packed = pack(a.data, a.aligned, a.pack, a.workers)
        print(json.dumps(packed))
        return packed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    recipe = TINY_RECIPE if a.tiny else GPU_RECIPE
    a.out.mkdir(parents=True, exist_ok=True)
    run = Parts(
        a.out,
        a.deadline,
        {
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "tiny": a.tiny,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "deadline_s": a.deadline,
        },
    )
    result = run.result

    def echo(line: str) -> None:
        print(line, flush=True)

    def faces() -> dict:
        if a.faces is not None:
            built: ModelBuild = PackedBuild(a.faces, a.work, recipe, a.workers, echo)
        else:
            built = ModelBuild(a.data, a.work, recipe, a.aligned, workers=a.workers, echo=echo)
        built.out.mkdir(parents=True, exist_ok=True)
        builds.append(built)
        return built.shards()

    builds: list[ModelBuild] = []
    if run.run("shards", faces) is None:
        return result  # nothing below runs without the faces
    build = builds[0]
    shards = build.out / "shards" / "train"
    in_batch, in_batches = (32, 3) if a.tiny else (1024, 200)
    run.run("input", lambda: input_throughput(shards, in_batch, in_batches, a.workers, cuda))
    arch, batch, steps = ("vit_micro", 8, 2) if a.tiny else ("vit_base", a.mae_batch, 50)
    run.run("mae_step", lambda: mae_throughput(shards, arch, batch, steps, recipe.mae_workers, device, run))
    budgets = _vit_s_budgets(run, a.mae_seconds, a.age_seconds)
    n_train = len(build.part("train")[0])
    # the MAE stage's loader has the recipe's workers, the input part timed one per core
    input_ips = result.get("input", {}).get("images_per_s_per_worker", 1e9) * max(1, recipe.mae_workers)
    sized: list[Recipe] = []

    def size() -> dict:
        cut, timing = sized_recipe(recipe, shards, n_train, budgets, input_ips, device)
        sized.append(cut)
        return {**timing, "budgets_s": [round(b, 1) for b in budgets]}

    if run.run("sizing", size, needs=RESERVE_S) is None:
        return result
    recipe = build.recipe = sized[0]
    result["recipe"] = asdict(recipe)
    if run.run("mae", build.mae) is None:
        return result
    encoder = build.out / "mae" / MAE_ENCODER
    if run.run("age", lambda: build.age("age", encoder, torch.get_num_threads())) is None:
        return result
    age_model = build.out / "age" / FINAL_MODEL
    decades = json.loads((build.out / "age" / "validation" / METRICS_FILE).read_text(encoding="utf-8"))
    result["age"]["val_by_decade"] = {d: m["mae"] for d, m in decades["by_decade"].items()}
    for stage, curve in (("mae", "loss_curve.png"), ("age", "curve.png")):
        atomic_write_bytes(a.out / f"{stage}_curve.png", (build.out / stage / curve).read_bytes())
    max_bytes = int(a.max_file_mib * 2**20)
    run.run("weights", lambda: export_weights(age_model, a.out, f"age_{recipe.arch}.safetensors", max_bytes))
    records, images = build.part("validation")
    n = 64 if a.tiny else len(records)
    ages = np.array([r.age for r in records[:n]])
    torch.backends.cuda.matmul.allow_tf32 = False  # as at a site: fahr-client leaves torch's default
    with tempfile.TemporaryDirectory() as ledger_dir:  # a fresh budget on every run
        run.run(
            "site",
            lambda: site_training(age_model, images[:n], ages, Path(ledger_dir), recipe.arch),
            needs=SITE_S,
        )
    print("\n| figure | value |\n|---|---|")
    for section in ("input", "mae_step", "sizing", "age", "weights", "site", "skipped", "errors"):
        for k, v in result.get(section, {}).items():
            print(f"| {section}.{k} | {v} |")
    return result


if __name__ == "__main__":
    main()
