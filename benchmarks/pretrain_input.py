"""Pre-training input throughput: JPEG folder vs pre-decoded shards, and one vit_micro MAE step on CPU.

Measures, in one process with one torch thread (the input pipeline of one DataLoader worker):
  (a) `fahr shards build` of N UTKFace JPEGs (200x200 -> 112x112): images/s converted;
  (b) `FaceStream` over the JPEG folder (decode + resize per image): images/s delivered;
  (c) `FaceStream` over the shards (memory-mapped, random order): images/s delivered;
  (d) one MAE optimiser step of vit_micro (decoder 64-d x 1 block) at batch B: ms and images/s.
Reads ../shared/data/utkface (or the bundled demo faces without it). Prints Markdown for
docs/performance.md with the machine, date and load average (other jobs inflate wall times).

    python benchmarks/pretrain_input.py [--n 1024] [--batch 64]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fahr_core.cohort import demo_faces_dir
from fahr_core.faces.images import to_input
from fahr_core.models.mae import MAE
from fahr_core.train.pretrain import FaceStream, FolderSource, list_images, mask_noise
from fahr_core.train.shards import ShardReader, build_shards

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface" / "images"


class Clock:
    """Wall and CPU seconds of a block: on a shared machine the CPU time is the steadier number."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, images: int) -> str:
        return f"{images / self.wall:.0f} | {images / self.cpu:.0f}"


def _stream(stream: FaceStream, batches: int) -> Clock:
    it = iter(stream)
    next(it)  # maps the first shard / warms the decoder
    with Clock() as c:
        for _ in range(batches):
            next(it)
    return c


def _mae_steps(batch: int, steps: int) -> Clock:
    torch.manual_seed(0)
    mae = MAE("vit_micro", 112, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    x = to_input(torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8))

    def step(k: int) -> None:
        loss, _, _ = mae(x, noise=mask_noise(0, k, batch, mae.num_patches))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # the first step allocates
    with Clock() as c:
        for k in range(steps):
            step(k + 1)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="MAE steps timed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    src_dir = SHARED if SHARED.is_dir() else demo_faces_dir() / "images"
    names = list_images(src_dir)[: a.n]
    batches = len(names) // a.batch - 1
    with tempfile.TemporaryDirectory() as tmp:
        with Clock() as convert:
            build_shards([(n, src_dir / n) for n in names], Path(tmp), shard_size=256)
        jpeg = _stream(FaceStream(FolderSource(src_dir, names, 112), a.batch), batches)
        shards = _stream(FaceStream(ShardReader(Path(tmp), 112), a.batch), batches)
    mae = _mae_steps(a.batch, a.steps)
    delivered = batches * a.batch

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {now}, load average {load}")
    print(f"{len(names)} images from {src_dir.name}/, batch {a.batch}, one process, torch threads 1\n")
    print("| stage | images/s (wall) | images per CPU-second |")
    print("|---|---|---|")
    print(f"| `fahr shards build` (decode JPEG, resize to 112, write) | {convert.rates(len(names))} |")
    print(f"| input from the JPEG folder (decode + resize per image) | {jpeg.rates(delivered)} |")
    print(f"| input from shards (memory-mapped, random order) | {shards.rates(delivered)} |")
    print(
        f"| vit_micro MAE step (decoder 64x1), {1000 * mae.cpu / a.steps:.0f} CPU-ms per step "
        f"| {mae.rates(a.steps * a.batch)} |"
    )


if __name__ == "__main__":
    main()
