"""What DP-SGD costs in training speed: images/s with and without DP, same model, batch and precision.

For each fine-tuning mode, one model and one batch of real faces (the bundled demo sample) are
trained step by step through the site's own step loop (fahr_core.train.local._run_steps) in
round robin: a plain step (forward, backward, AdamW), a DP-SGD step with Opacus' per-sample
hooks and a DP-SGD step with ghost clipping (both: per-patient clipping, the site's ChaCha20
Gaussian noise, AdamW), each on its own copy of the model, so all three see the same load on a
shared machine. The ratios DP/plain are the cost. The noise alone (a ChaCha20 keystream turned
into float32 normals on the device) is timed separately, per million trained parameters.

    python benchmarks/dp_cost.py --arch vit_micro --batch 32 --steps 12 --threads 2   # CPU
    python benchmarks/dp_cost.py --arch vit_base --batch 64 --steps 20 --device cuda  # GPU, ViT-B/16
    python benchmarks/dp_cost.py --tiny                                               # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fahr_core.cohort import demo_faces_dir
from fahr_core.config import CLIPPING_METHODS, ModelConfig
from fahr_core.faces.images import load_faces
from fahr_core.models.finetune import build
from fahr_core.privacy.randomness import SecureStream
from fahr_core.train.local import _private, _run_steps

HORIZON = 10.0
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _arms(spec: ModelConfig, device: torch.device) -> dict[str, Callable[[list[Batch]], float]]:
    """One step function per arm ("plain", then "dp hooks", "dp ghost"), each with its own model copy."""
    torch.manual_seed(0)
    base = build(spec).to(device).train()
    plain = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(_trainable(plain), lr=1e-3)
    arms = {"plain": lambda b: _run_steps(plain, b, plain_opt, HORIZON, "discrete_hazard", device)}
    for clipping in CLIPPING_METHODS:
        model = copy.deepcopy(base)
        dp_model, optimizer_class = _private(model, clipping, 1.0)
        dp_opt = optimizer_class(
            torch.optim.AdamW(_trainable(model), lr=1e-3),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=32.0,
            stream=SecureStream(os.urandom(32)),
        )
        arms[f"dp {clipping}"] = lambda b, m=dp_model, o=dp_opt: _run_steps(
            m, b, o, HORIZON, "discrete_hazard", device
        )
    return arms


def measure(spec: ModelConfig, batch: Batch, steps: int, device: torch.device) -> dict[str, float]:
    """Images/s per arm: the median over `steps` round-robin steps, after one warm-up step each."""
    arms = _arms(spec, device)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(steps + 1):
        for name, step in arms.items():
            _sync(device)
            started = time.perf_counter()
            step([batch])
            _sync(device)
            if i:  # the first step of each warms caches and allocators
                times[name].append(time.perf_counter() - started)
    return {name: len(batch[0]) / statistics.median(t) for name, t in times.items()}


def keystreams_agree(device: torch.device, n: int = 1_000_003) -> bool:
    """Whether torch's keystream on `device` gives the same normals as OpenSSL's (CI has no GPU to check)."""
    key = os.urandom(32)
    made_there = SecureStream(key, keystream="torch").normal((n,), device=device)
    made_here = SecureStream(key, keystream="openssl").normal((n,), device=device)
    return bool(torch.equal(made_there, made_here))


def noise_ms_per_million(device: torch.device, n: int = 8_000_000, repeats: int = 5) -> float:
    """Milliseconds to draw one million float32 N(0, 1) on `device` from a fresh ChaCha20 stream."""
    stream = SecureStream(os.urandom(32))
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        stream.normal((n,), device=device, dtype=torch.float32)
        _sync(device)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[1:]) / (n / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_micro")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="full,last:1,head,lora,ffa-lora")
    ap.add_argument("--tiny", action="store_true", help="smoke run: vit_micro, batch 4, 2 steps, on the CPU")
    a = ap.parse_args()
    if a.tiny:
        a.arch, a.batch, a.steps, a.device = "vit_micro", 4, 2, "cpu"
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    paths = sorted((demo_faces_dir() / "images").iterdir())[: a.batch]
    x = torch.from_numpy(load_faces(paths, 112)).to(device)
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(len(x), generator=g) * 12).to(device)
    e = (torch.rand(len(x), generator=g) < 0.4).float().to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{a.threads} torch threads"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"# DP cost — {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.machine()}, {where}, "
        f"torch {torch.__version__}, {a.arch}, 112 px, batch {len(x)}, float32, median of {a.steps} "
        f"round-robin steps; load average before {load}\n"
    )
    noise = noise_ms_per_million(device, n=1_000_000 if a.tiny else 8_000_000)
    print(f"Noise (ChaCha20 keystream to float32 normals on {a.device}): {noise:.1f} ms per M parameters")
    print(f"torch's keystream on {a.device} equals OpenSSL's: {keystreams_agree(device)}\n")
    print(
        "| mode | trainable params | plain images/s | DP hooks | DP ghost | hooks / plain | ghost / plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        spec = replace(ModelConfig(arch=a.arch), finetune=mode)
        n = sum(p.numel() for p in _trainable(build(spec)))
        r = measure(spec, (x, t, e), a.steps, device)
        plain, hooks, ghost = r["plain"], r["dp hooks"], r["dp ghost"]
        print(
            f"| {mode} | {n:,} | {plain:.1f} | {hooks:.1f} | {ghost:.1f} "
            f"| {hooks / plain:.3f} | {ghost / plain:.3f} |",
            flush=True,
        )
    print(f"\nload average after: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
