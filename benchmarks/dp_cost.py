"""What DP-SGD costs in training speed: images/s with and without DP, same model, batch and precision.

For each fine-tuning mode, one model and one batch of real faces (the bundled demo sample) are
trained step by step, alternating a plain step (forward, backward, AdamW) and a DP-SGD step
(Opacus' per-sample gradient hooks, per-sample clipping, Gaussian noise, AdamW) on the same
model copy, so both see the same load on a shared machine. The ratio DP/plain is the cost.

    python benchmarks/dp_cost.py --arch vit_micro --batch 32 --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from dataclasses import replace

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fahr_core.cohort import demo_faces_dir
from fahr_core.config import ModelConfig
from fahr_core.faces.images import load_faces, to_input
from fahr_core.models.finetune import build
from fahr_core.survival.losses import discrete_hazard_nll


def _step(model, optimizer, x, t, e) -> None:
    optimizer.zero_grad(set_to_none=True)
    eta, alpha = model(x)
    discrete_hazard_nll(eta, alpha, t, e, 10.0).backward()
    optimizer.step()


def measure(
    spec: ModelConfig, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, steps: int
) -> tuple[float, float]:
    """(plain images/s, DP images/s): medians over `steps` alternating steps after one warm-up each."""
    torch.manual_seed(0)
    plain = build(spec)
    private = copy.deepcopy(plain)
    params = [p for p in plain.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(params, lr=1e-3)
    gsm = GradSampleModule(private, loss_reduction="mean")
    dp_params = [p for p in private.parameters() if p.requires_grad]
    dp_opt = DPOptimizer(
        torch.optim.AdamW(dp_params, lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=len(x),
    )
    plain.train()
    gsm.train()
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for i in range(steps + 1):
        for name, model, opt in (("plain", plain, plain_opt), ("dp", gsm, dp_opt)):
            started = time.perf_counter()
            _step(model, opt, x, t, e)
            if i:  # the first step of each warms caches and allocators
                times[name].append(time.perf_counter() - started)
    gsm.remove_hooks()
    return len(x) / statistics.median(times["plain"]), len(x) / statistics.median(times["dp"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_micro")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="full,last:1,lora,ffa-lora")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    paths = sorted((demo_faces_dir() / "images").iterdir())[: a.batch]
    x = to_input(load_faces(paths, 112))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(a.batch, generator=g) * 12
    e = (torch.rand(a.batch, generator=g) < 0.4).float()
    load = " / ".join(f"{v:.1f}" for v in __import__("os").getloadavg())
    print(
        f"# DP cost — {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.machine()}, "
        f"{a.threads} torch threads, torch {torch.__version__}, {a.arch}, 112 px, batch {a.batch}, "
        f"float32, median of {a.steps} alternating steps; load average before {load}\n"
    )
    print("| mode | trainable params | plain images/s | DP-SGD images/s | DP / plain |")
    print("|---|---|---|---|---|")
    for mode in a.modes.split(","):
        spec = replace(ModelConfig(arch=a.arch), finetune=mode)
        n = sum(p.numel() for p in build(spec).parameters() if p.requires_grad)
        fast, slow = measure(spec, x, t, e, a.steps)
        print(f"| {mode} | {n:,} | {fast:.1f} | {slow:.1f} | {slow / fast:.2f} |")


if __name__ == "__main__":
    main()
