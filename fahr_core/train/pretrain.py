"""MAE pre-training of the FAHR-Face encoder on a folder of face crops (WebFace42M or any folder)
or on pre-decoded shards of them (`fahr_core.train.shards`): one trainer, two data sources.

Determinism is by construction, so a run resumed from its checkpoint continues exactly as if never
stopped, and N processes under torchrun train like one process with the same global batch:
- the data order is a seeded permutation of the images per epoch (a folder's sorted file list, or
  the shards' order, which is the same list less the skipped files); global micro-batch k is
  a fixed slice of it, rank r reads its own part of that slice, and DataLoader worker w of a rank
  builds the micro-batches with (k - start) % workers == w (the DataLoader hands them back in order);
- the mask noise of micro-batch k is drawn for the whole global batch from a generator seeded by
  (seed, k), and each rank takes its rows;
- the checkpoint holds the model, optimiser, schedule step, RNG states and the data position.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fahr_core.faces.images import PhotoError, load_face, to_input
from fahr_core.io import atomic_write_bytes, atomic_write_text
from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_core.models.checkpoint import save_weights
from fahr_core.models.mae import MAE
from fahr_core.train.shards import ShardReader, is_shard_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHECKPOINT = "checkpoint.pt"
FILE_LIST = "files.txt"


@dataclass
class PretrainConfig:
    arch: str = FAHR_FACE_ARCH
    img_size: int = 112
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    batch_size: int = 256  # per process and micro-step
    accum_steps: int = 1
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 2000
    total_steps: int = 100_000
    bf16: bool = True  # autocast on CUDA only; CPU runs in float32
    compile: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    num_workers: int = 8
    seed: int = 0

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.accum_steps * world_size

    def lr(self, world_size: int) -> float:
        return self.base_lr * self.global_batch(world_size) / 256


def list_images(data_dir: Path) -> list[str]:
    """Every image under `data_dir` (identity folders or flat), as sorted relative POSIX paths."""
    data_dir = Path(data_dir)
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        rel = Path(root).relative_to(data_dir)
        found += [(rel / f).as_posix() for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    found.sort()
    return found


def load_file_list(data_dir: Path, out_dir: Path) -> list[str]:
    """The run's file list: listed once and kept in out_dir, so a resumed run reads the same data."""
    path = Path(out_dir) / FILE_LIST
    if path.exists():
        return path.read_text(encoding="utf-8").splitlines()
    files = list_images(data_dir)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no images found")
    atomic_write_text(path, "\n".join(files) + "\n")
    return files


class FolderSource:
    """Images of a folder, decoded as they are read; only the file names are held."""

    def __init__(self, data_dir: Path, files: list[str], img_size: int):
        # One bytes array rather than a list of str: at WebFace42M scale a list costs GBs per
        # DataLoader worker (reference counts defeat copy-on-write); the array is shared.
        self.data_dir, self.files, self.img_size = Path(data_dir), np.array(files, dtype=np.bytes_), img_size
        self.fingerprint = hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, name: bytes) -> np.ndarray:
        try:
            return load_face(self.data_dir / name.decode("utf-8"), self.img_size)
        except PhotoError as e:
            # A constant grey image keeps every batch full (and the run deterministic); it is cheap
            # to learn and, with norm-pix targets, contributes a zero target.
            log.warning("%s; using a grey image in its place", e)
            return np.full((3, self.img_size, self.img_size), 127, np.uint8)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, S, S) of the images at `indices`."""
        return np.stack([self._load(self.files[i]) for i in indices])


FaceSource = FolderSource | ShardReader  # both: len(), read(indices) -> uint8 (B, 3, S, S), fingerprint


def open_source(data: Path, out_dir: Path, img_size: int) -> FaceSource:
    """Shards when `data` holds a shard index (`fahr shards build`), else a folder of photos."""
    if is_shard_dir(data):
        return ShardReader(data, img_size)
    return FolderSource(data, load_file_list(data, out_dir), img_size)


class FaceStream(IterableDataset):
    """Endless stream of uint8 micro-batches (k, (B, 3, S, S)) for one rank, from micro-batch `start`.

    Each epoch is a permutation of the source's images seeded by (seed, epoch); the last incomplete
    global micro-batch of an epoch is dropped. The source reads only the images asked for.
    """

    def __init__(
        self,
        source: FaceSource,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
    ):
        self.source = source
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start = seed, start
        self.global_micro = batch_size * world_size
        self.per_epoch = len(source) // self.global_micro
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(source)} images is fewer than one global micro-batch ({self.global_micro})"
            )

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of global micro-batch k."""
        return divmod(k, self.per_epoch)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + worker  # the DataLoader asks workers in turn, starting with worker 0
        perm_epoch, perm = -1, np.empty(0, np.int32)
        while True:
            epoch, index = self.position(k)
            if epoch != perm_epoch:
                perm = (
                    np.random.default_rng([self.seed, epoch]).permutation(len(self.source)).astype(np.int32)
                )
                perm_epoch = epoch
            lo = index * self.global_micro + self.rank * self.batch_size
            yield k, torch.from_numpy(self.source.read(perm[lo : lo + self.batch_size]))
            k += n_workers


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then half-cosine down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and tokens (any parameter with fewer than 2 dims)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mask_noise(seed: int, k: int, global_micro: int, num_patches: int) -> torch.Tensor:
    """Mask noise of global micro-batch k, for the whole global micro-batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return torch.rand(global_micro, num_patches, generator=g)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy tuple's key array (numpy types the tuple loosely)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    # Only tensors and plain containers are stored, so the safe (weights_only) unpickler reads it.
    return torch.load(path, map_location="cpu", weights_only=True)


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def write_curve(out_dir: Path, history: list[dict]) -> None:
    """loss_curve.csv (step, loss, lr, images_per_s) and loss_curve.png."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "images_per_s"], lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out_dir / "loss_curve.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("MAE loss (masked patches)")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, label="lr")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out_dir / "loss_curve.png", png.getvalue())


def pretrain(
    cfg: PretrainConfig,
    data_dir: Path,
    out_dir: Path,
    resume: bool = False,
    stop_at: int | None = None,
    echo: Callable[[str], object] = print,
) -> dict:
    """Train (or, with `resume`, continue from out_dir/checkpoint.pt) to cfg.total_steps.

    `stop_at` ends the run after that many optimiser steps, checkpointed, as a pre-emption would.
    Returns a summary: steps, images_seen, final_loss, the checkpoint path and per-step history.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rank, world, device = _dist_setup()
    main = rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        if main:
            open_source(data_dir, out_dir, cfg.img_size)  # writes files.txt once, for all ranks
        dist.barrier()
    source = open_source(data_dir, out_dir, cfg.img_size)

    torch.manual_seed(cfg.seed)
    mae = MAE(
        cfg.arch,
        cfg.img_size,
        cfg.decoder_dim,
        cfg.decoder_depth,
        cfg.decoder_heads,
        cfg.mask_ratio,
        cfg.norm_pix_loss,
    ).to(device)
    opt = torch.optim.AdamW(
        param_groups(mae, cfg.weight_decay),
        lr=cfg.lr(world),
        betas=(cfg.betas[0], cfg.betas[1]),
        fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.total_steps))

    ckpt_path = out_dir / CHECKPOINT
    step, history = 0, []
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        mae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        if state.get("data_fingerprint", source.fingerprint) != source.fingerprint:
            raise ValueError(
                f"{data_dir}: not the images {ckpt_path} was trained on (they were {state['data_dir']})"
            )
        _set_rng_state(state["rng"])
        if main:
            echo(f"resumed from {ckpt_path} at step {step} (epoch {state['epoch']}, index {state['index']})")
    elif resume and main:
        echo(f"no checkpoint at {ckpt_path}; starting from scratch")

    model: torch.nn.Module | torch.nn.parallel.DistributedDataParallel = mae
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            mae, device_ids=[device.index] if device.type == "cuda" else None
        )
    fwd = torch.compile(model) if cfg.compile else model

    stream = FaceStream(source, cfg.batch_size, rank, world, cfg.seed, start=step * cfg.accum_steps)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    batches = iter(loader)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
    )
    global_batch = cfg.global_batch(world)
    end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)

    def save() -> None:
        k = step * cfg.accum_steps
        epoch, index = stream.position(k)
        state = {
            "model": mae.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "micro_batches": k,
            "epoch": epoch,
            "index": index,
            "images_seen": step * global_batch,
            "world_size": world,
            "config": asdict(cfg),
            "data_dir": str(data_dir.resolve()),
            "data_fingerprint": source.fingerprint,
            "history": history,
            "rng": _rng_state(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(ckpt_path, buf.getvalue())
        write_curve(out_dir, history)

    if main:
        echo(
            f"MAE pre-training {cfg.arch} on {len(source)} images, {world} process(es) on {device}, "
            f"global batch {global_batch}, lr {cfg.lr(world):.3g}, steps {step}->{end}"
        )
    mae.train()
    t_log, img_log = time.perf_counter(), 0
    while step < end:
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(cfg.accum_steps):
            k, batch = next(batches)
            expected = step * cfg.accum_steps + micro
            if k != expected:
                raise RuntimeError(f"data stream out of order: got micro-batch {k}, expected {expected}")
            x = to_input(batch.to(device, non_blocking=True))
            noise = mask_noise(cfg.seed, k, stream.global_micro, mae.num_patches)
            noise = noise[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            sync = world == 1 or micro == cfg.accum_steps - 1
            # between synchronising steps DDP accumulates locally (sync is False only when world > 1)
            ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
            with nullcontext() if sync or ddp is None else ddp.no_sync(), autocast:
                loss, _, _ = fwd(x, noise=noise)
            (loss / cfg.accum_steps).backward()
            total += loss.detach() / cfg.accum_steps
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        step += 1
        if world > 1:
            dist.all_reduce(total)
            total /= world
        ips = global_batch / (time.perf_counter() - t0)
        history.append({"step": step, "loss": float(total), "lr": lr, "images_per_s": round(ips, 2)})
        img_log += global_batch
        if main and (step % cfg.log_every == 0 or step == end):
            now = time.perf_counter()
            echo(
                f"step {step}/{cfg.total_steps}  loss {float(total):.4f}  lr {lr:.3g}  "
                f"{img_log / (now - t_log):.1f} images/s"
            )
            t_log, img_log = now, 0
        if main and (step % cfg.checkpoint_every == 0 or step == end):
            save()
    del batches
    if world > 1:
        dist.barrier()
    return {
        "steps": step,
        "images_seen": step * global_batch,
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint": str(ckpt_path),
        "history": history,
    }


def export_encoder(checkpoint: Path, out_path: Path) -> Path:
    """Write the encoder of a pre-training checkpoint as safetensors, and a model card beside it.

    The file loads with `fahr_core.models.checkpoint.load_encoder_weights` into a SurvivalViT.
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    enc = {k[len("encoder.") :]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    final = state["history"][-1]["loss"] if state["history"] else float("nan")
    meta = {
        "format": "fahr-mae-encoder",
        "arch": cfg["arch"],
        "img_size": str(cfg["img_size"]),
        "steps": str(state["step"]),
        "images_seen": str(state["images_seen"]),
        "final_loss": f"{final:.6g}",
    }
    save_weights(out_path, enc, metadata=meta)
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * state["world_size"]
    card = (
        f"# FAHR-Face encoder ({cfg['arch']}, MAE pre-trained)\n\n"
        f"- weights: `{out_path.name}` (safetensors, timm VisionTransformer keys)\n"
        f"- data folder: `{state['data_dir']}`\n"
        f"- input: {cfg['img_size']}x{cfg['img_size']} RGB, pixels scaled to [-1, 1]\n"
        f"- steps: {state['step']}, global batch {global_batch}"
        f", images seen: {state['images_seen']}\n"
        f"- mask ratio {cfg['mask_ratio']}, decoder {cfg['decoder_dim']}-d x {cfg['decoder_depth']}, "
        f"norm-pix loss {cfg['norm_pix_loss']}\n"
        f"- final loss: {final:.4f}\n"
        f"- load with `fahr_core.models.checkpoint.load_encoder_weights(model.encoder, path)`\n"
    )
    atomic_write_text(out_path.with_suffix(".md"), card)
    return out_path


@torch.no_grad()
def reconstruction_figure(mae: MAE, images: np.ndarray | torch.Tensor, out_png: Path, seed: int = 0) -> Path:
    """The MAE paper's figure: per face (columns) the face, its masked input, the reconstruction
    with the visible patches pasted back. With a norm-pix model the predicted patches are shown
    with the true per-patch mean and variance put back (as the paper's visualisations do).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = torch.as_tensor(images)
    x = to_input(imgs) if imgs.dtype == torch.uint8 else imgs.float()
    was_training = mae.training
    mae.eval()
    device = next(mae.parameters()).device
    _, pred, mask = mae(x.to(device), generator=torch.Generator().manual_seed(seed))
    mae.train(was_training)
    pred, mask, x = pred.float().cpu(), mask.cpu(), x.cpu()
    if mae.norm_pix_loss:
        t = mae.patchify(x)
        pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
    m = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    rec = mae.unpatchify(pred)
    rows = [("face", x), ("masked 75%", x * (1 - m)), ("reconstruction + visible", x * (1 - m) + rec * m)]

    n = x.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for r, (title, im) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(((im[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
